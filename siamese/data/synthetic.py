"""Procedural lesion pairs: smooth "tissue" with 1-2 irregular, redder lesions and their masks.

No medical data is redistributable or installable offline, so tests, tiny configs and the demo train on these:
``synthetic_pair(index, resolution, seed)`` is deterministic per (seed, index), ``write_synthetic_dataset`` writes
them in the training layout (``images/``, ``masks/``, ``prompt.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ldm.fileio import write_text_atomic

import cv2
import numpy as np

from siamese.data.images import write_png
from siamese.data.layout import DEFAULT_PROMPT, PROMPT_FILE
from siamese.data.masks import mask_to_png

__all__ = ["synthetic_pair", "write_synthetic_dataset"]

logger = logging.getLogger(__name__)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [-1, 1]: a cells×cells random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _lesion_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Union of 1-2 rotated, elongated blobs whose radius varies with a few angular harmonics."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in (0, 1)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        radius = rng.uniform(0.1, 0.22)
        aspect = rng.uniform(0.7, 1.0)
        angle = rng.uniform(0.0, np.pi)
        amplitudes, phases = rng.uniform(0.0, 0.12, size=3), rng.uniform(0.0, 2 * np.pi, size=3)
        # Only evaluate the blob's bounding square (max radius 1.36 * radius): keeps large resolutions cheap.
        reach = radius * (1.0 + amplitudes.sum())
        x0, x1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 1)
        y0, y1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 1)
        dx, dy = coords[None, x0:x1] - cx, coords[y0:y1, None] - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / aspect
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        theta = np.arctan2(v, u)
        boundary = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 5), amplitudes, phases))
        mask[y0:y1, x0:x1] |= np.hypot(u, v) <= radius * boundary
    mask01 = mask.astype(np.uint8)
    # Guarantee "non-empty and not full" even at toy resolutions (a few pixels) where a blob can miss every centre.
    if not mask01.any():
        mask01[size // 2, size // 2] = 1
    if mask01.all():
        mask01[0, 0] = 0
    return mask01


def _tissue_image(rng: np.random.Generator, mask01: np.ndarray) -> np.ndarray:
    """Pinkish mucosa with soft shading and a few vessels; the lesion is redder, brighter and more granular."""
    size = mask01.shape[0]
    base = np.array([205.0, 120.0, 110.0], dtype=np.float32) + rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
    shade = 0.12 * _smooth_noise(rng, size, 4) + 0.05 * _smooth_noise(rng, size, 8)
    tissue = base * (1.0 + shade[..., None])

    # Vessels: thin darker-red polylines along random smooth curves.
    vessels = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        t = np.linspace(0.0, 1.0, 12)
        start, end = rng.uniform(0.0, 1.0, size=(2, 2))
        wobble = 0.08 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * t + rng.uniform()))
        points = start[None] + (end - start)[None] * t[:, None] + wobble[:, None]
        cv2.polylines(vessels, [np.round(points * (size - 1)).astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
    tissue *= 1.0 - 0.3 * vessels[..., None] * np.array([0.3, 1.0, 1.0], dtype=np.float32)

    lesion_colour = np.array([225.0, 95.0, 80.0], dtype=np.float32) + rng.uniform(-10.0, 10.0, 3).astype(np.float32)
    granular = 0.1 * _smooth_noise(rng, size, max(2, size // 4))
    lesion = lesion_colour * (1.0 + granular[..., None])

    # Slightly soft edge (as in real images) while the lesion interior remains clearly distinct.
    alpha = cv2.GaussianBlur(mask01.astype(np.float32), (3, 3), 0)[..., None]
    image = (1.0 - alpha) * tissue + alpha * lesion

    # Endoscope-like vignetting.
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    radius2 = coords[None, :] ** 2 + coords[:, None] ** 2
    image *= (1.0 - 0.25 * radius2 / 2.0)[..., None]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def synthetic_pair(index: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 RGB image, uint8 {0, 1} mask) of synthetic sample ``index``; a pure function of its inputs."""
    # SeedSequence over (seed, index): independent streams per sample, no overlap between e.g. (0, 1) and (1, 0).
    rng = np.random.default_rng((int(seed), int(index)))
    mask01 = _lesion_mask(rng, resolution)
    return _tissue_image(rng, mask01), mask01


def write_synthetic_dataset(
    root: str | Path,
    num_samples: int,
    resolution: int,
    seed: int = 0,
    *,
    prompt: str = DEFAULT_PROMPT,
    overwrite: bool = False,
) -> Path:
    """Write ``num_samples`` synthetic pairs as ``root/images/*.png``, ``root/masks/*.png`` (0/255) and
    ``root/prompt.json`` (relative paths). Returns the prompt file. Refuses to replace an existing prompt file
    unless ``overwrite``; the prompt file is written to a temporary name and renamed, so it is never half written.
    """
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    root = Path(root)
    prompt_file = root / PROMPT_FILE
    if prompt_file.exists() and not overwrite:
        raise FileExistsError(f"{prompt_file} already exists (pass overwrite=True to replace it)")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num_samples):
        rgb, mask01 = synthetic_pair(index, resolution, seed)
        name = f"synthetic_{index:06d}.png"
        # PNG for images too: lossless, so a round trip through MaskImageDataset reproduces the generated pixels.
        write_png(root / "images" / name, rgb)
        write_png(root / "masks" / name, mask_to_png(mask01))
        lines.append(json.dumps({"source": f"masks/{name}", "target": f"images/{name}", "prompt": prompt}))
    write_text_atomic(prompt_file, "\n".join(lines) + "\n")
    logger.info("wrote %d synthetic pairs (%d px) to %s", num_samples, resolution, root)
    return prompt_file
