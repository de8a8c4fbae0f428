"""Stable Diffusion 1.5 building blocks in pure PyTorch (no Lightning, no DeepSpeed)."""

from ldm import _compat  # noqa: F401  (torchvision shim on CPU-only installs; must run first)
