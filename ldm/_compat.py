"""Import-time compatibility shim for CPU-only PyTorch installs.

PyPI ships torchvision (pulled in by open-clip-torch and torchmetrics) only as a CUDA build. Next to a CPU build of
torch its C extension cannot load, and ``import torchvision`` then fails with ``operator torchvision::nms does not
exist``, which in turn breaks ``import pytorch_lightning`` and ``import open_clip``. Nothing in this project uses
torchvision's C++ operators, so when (and only when) the extension fails to load we declare the two operator
schemas torchvision's Python code looks up at import time. A working (GPU) install is left untouched.

Every package of this project imports this module first, so every process (pytest, Lightning-launched ranks, the
CLIs) gets the shim before torchvision is first imported.
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


apply()
