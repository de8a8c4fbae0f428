"""Old import paths of modules that moved into rooms (see CHANGELOG.md), kept working with a DeprecationWarning.

``import siamese.masks`` (or ``from siamese.masks import read_mask``) gets the module ``siamese.data.masks`` itself,
not a copy: the same objects, so patching or ``isinstance`` checks behave as before. A meta-path finder does it, so
the rooms hold no shim files; ``siamese/__init__.py`` installs it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    "siamese.masks": "siamese.data.masks",
    "siamese.data_check": "siamese.data.check",
    "siamese.data_prep": "siamese.data.prepare",
    "siamese.pairs_io": "siamese.data.pairs",
    "siamese.maskgen": "siamese.meddiff.maskgen",
    "siamese.maskgen_config": "siamese.config.maskgen",
    "siamese.repair": "siamese.meddiff.repair",
    "siamese.evaluation.filtering": "siamese.meddiff.filtering",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (CHANGELOG.md)", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module was executed under its new name already."""


def install() -> None:
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Alias())
