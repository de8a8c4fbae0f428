"""Which latent cells background-preserving sampling generates, for a mask at image resolution.

MedDiff-FT's blend (Xie et al. 2025, eq. 2; ``ldm.sampler.background_denoiser``) acts on the latent, one cell per
``factor × factor`` image pixels (8 for SD1.5's VAE), so the image mask has to be turned into a latent region. The
choice decides how far generation spreads beyond the saved label; ``spec`` names it:

* ``max-pool`` (the default, and the only rule before it could be chosen): a cell is generated when any of its pixels
  lies in the mask. The region covers the whole mask, and at factor 8 reaches up to 7 pixels beyond it.
* ``area:F`` (0 < F ≤ 1): a cell is generated when the mask covers at least the share F of its pixels, i.e.
  ``count ≥ ⌈F · factor²⌉`` pixels. ``area:0.5`` is the nearest-cell rounding of the mask: the region gains and loses
  about as many pixels as the mask; ``area:1`` generates only cells inside the mask.
* ``dilate:N`` (N ≥ 0 an integer): the mask is first dilated by N image pixels with a Euclidean disk — pixel p joins
  when some mask pixel q has ``|p − q|₂ ≤ N`` (outside the image counts as not in the mask) — and then ``area:0.5``
  acts on the dilated mask. ``dilate:0`` is ``area:0.5``.

A mask pixel is "in the mask" when its value is > 0.5 (masks in [0, 1]). The image pixels treated as generated are
those of a generated cell (``image_region``: the latent region upsampled by the factor); a filter or a fidelity
measure that separates generated from kept pixels must use that, not the saved mask. ``parse_region`` gives the
canonical string (``str(spec)``) that a pairs manifest records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ldm.settings import DEFAULT_REGION, REGION_HELP, REGION_MODES, RegionSpec, parse_region  # noqa: F401

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _disk(pixels: int, device: torch.device) -> Tensor:
    """The (2N+1)² structuring element ``{(i, j): i² + j² ≤ N²}`` as a 1×1×k×k float kernel."""
    r = torch.arange(-pixels, pixels + 1, device=device)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= pixels**2).float()[None, None]


def dilate_mask(inside: Tensor, pixels: int) -> Tensor:
    """A boolean B×1×H×W mask dilated by ``pixels`` with the Euclidean disk (outside the image: not in the mask)."""
    if pixels == 0:
        return inside
    hits = F.conv2d(inside.float(), _disk(pixels, inside.device), padding=pixels)
    return hits > 0.5


def latent_region(mask: Tensor, latent_size: Sequence[int], spec: str | RegionSpec = DEFAULT_REGION) -> Tensor:
    """The generated latent cells (bool B×1×h×w) for a mask in [0, 1] (B×1×H×W, or B×C×H×W: its first channel)
    under ``spec`` (module docstring). The image must be an exact multiple of the latent size, the same factor on
    both axes."""
    spec = parse_region(spec)
    if mask.dim() != 4:
        raise ValueError(f"latent_region: mask must be B×1×H×W, got shape {tuple(mask.shape)}")
    (height, width), (h, w) = mask.shape[-2:], (int(s) for s in latent_size)
    if h < 1 or w < 1 or height % h or width % w or height // h != width // w:
        raise ValueError(f"latent_region: mask {height}×{width} is not an exact multiple of the latent size {h}×{w} "
                         "(one factor for both axes)")
    factor = height // h
    inside = mask[:, :1].float() > 0.5
    if spec.mode == "max-pool":
        return F.max_pool2d(inside.float(), factor) > 0.5
    if spec.mode == "dilate":
        inside = dilate_mask(inside, spec.pixels)
    fraction = 0.5 if spec.mode == "dilate" else spec.fraction
    count = F.avg_pool2d(inside.float(), factor, divisor_override=1)  # exact integers: pixels in the mask per cell
    return count >= math.ceil(fraction * factor * factor - 1e-9)


def image_region(mask01: np.ndarray, factor: int, spec: str | RegionSpec = DEFAULT_REGION) -> np.ndarray:
    """The image pixels treated as generated (uint8 H×W in {0, 1}) for a mask (H×W, {0, 1}) at latent ``factor``:
    the cells of ``latent_region`` upsampled by the factor."""
    mask01 = np.asarray(mask01)
    if mask01.ndim != 2:
        raise ValueError(f"image_region: mask must be H×W, got shape {mask01.shape}")
    if factor < 1 or mask01.shape[0] % factor or mask01.shape[1] % factor:
        raise ValueError(f"image_region: mask {mask01.shape[0]}×{mask01.shape[1]} is not a multiple of the latent "
                         f"factor {factor}")
    size = (mask01.shape[0] // factor, mask01.shape[1] // factor)
    cells = latent_region(torch.from_numpy(mask01.astype(np.float32))[None, None], size, spec)[0, 0].numpy()
    return np.repeat(np.repeat(cells, factor, axis=0), factor, axis=1).astype(np.uint8)
