"""tools package."""

from ldm import _compat  # noqa: F401  (torchvision shim on CPU-only installs; must run first)
