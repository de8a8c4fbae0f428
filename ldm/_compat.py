"""Import-time compatibility shim for CPU-only PyTorch installs.

PyPI ships torchvision (pulled in by open-clip-torch and torchmetrics) only as a CUDA build. Next to a CPU build of
torch its C extension cannot load, and ``import torchvision`` then fails with ``operator torchvision::nms does not
exist``, which in turn breaks ``import pytorch_lightning`` and ``import open_clip``. Nothing in this project uses
torchvision's C++ operators, so when (and only when) the extension fails to load we declare the two operator
schemas torchvision's Python code looks up at import time. A working (GPU) install is left untouched.

Every package of this project imports this module first. It imports nothing heavy itself: it puts a finder at the
front of ``sys.meta_path`` that applies the shim the moment torchvision is first imported (by open_clip, Lightning,
torchmetrics, …), so every process (pytest, Lightning-launched ranks, the CLIs) gets it in time, and a process that
never imports torchvision (``--help``) never pays for importing torch.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARY = None  # keeps the torch.library registration alive for the life of the process


def _extension_loads(package_dir: str) -> bool:
    import torch

    candidates = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    if not candidates:
        return False
    try:
        torch.ops.load_library(candidates[0])
    except (OSError, RuntimeError):
        return False
    return True


def apply() -> bool:
    """Declare torchvision's op schemas if its extension cannot load. Returns True when the shim was applied."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return _LIBRARY is not None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    if _extension_loads(os.path.dirname(spec.origin)):
        return False
    import torch

    library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        library.define(schema)
    _LIBRARY = library
    return True


class _ShimOnImport:
    """A ``sys.meta_path`` finder that applies the shim just before the first ``import torchvision`` and then leaves
    the import to the normal finders."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (the importlib protocol)
        if name == "torchvision":
            _remove_finder()
            apply()
        return None


def _remove_finder() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _ShimOnImport)]


if "torchvision" in sys.modules:
    apply()  # already imported (by code that ran before this package): nothing to defer
elif not any(isinstance(finder, _ShimOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _ShimOnImport())
