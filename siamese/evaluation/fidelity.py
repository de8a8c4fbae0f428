"""Mask fidelity of generated pairs: segment each generated image and compare with the mask it was conditioned on.

The morphological fidelity Siamese-Diffusion claims to improve is measured as the Dice overlap between a
segmentation of the generated image and its conditioning mask. This module holds the overlap measure and, for the
framework's own generated lesion domain (``siamese.data.synthetic_pair``), a documented colour rule that segments
it without any trained network: lesions are redder than the surrounding tissue, so the green/red ratio is lower
inside them. The rule (``segment_generated_lesion``): G/R per pixel (+1 to avoid division by zero), Gaussian blur
with σ = 1 px, Otsu's threshold per image, foreground = the low-ratio side. On real generated images at 64 px it
reaches a mean Dice ≈ 0.96 against the true masks (``tests/test_fidelity.py`` checks ≥ 0.9), and ≈ 0.15 on noise.
It is meaningful only for that domain; real data needs a segmenter trained on the real pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from siamese.data import read_image_rgb
from siamese.masks import read_mask
from siamese.pairs_io import read_manifest

__all__ = ["PairScore", "dice", "score_pairs", "segment_generated_lesion"]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap ``2|P∩T| / (|P| + |T|)`` of two binary masks; two empty masks agree perfectly (1.0)."""
    if pred.shape != target.shape:
        raise ValueError(f"dice: masks of different shapes {pred.shape} and {target.shape}")
    p, t = pred.astype(bool), target.astype(bool)
    total = int(p.sum()) + int(t.sum())
    return 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total


def segment_generated_lesion(rgb: np.ndarray, blur_sigma: float = 1.0) -> np.ndarray:
    """The colour rule for the generated lesion domain: uint8 RGB H×W×3 → {0, 1} lesion mask."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image H×W×3, got {rgb.dtype} {rgb.shape}")
    rgb = rgb.astype(np.float32) + 1.0
    ratio = rgb[..., 1] / rgb[..., 0]
    if blur_sigma > 0:
        ratio = cv2.GaussianBlur(ratio, (0, 0), blur_sigma)
    scaled = np.clip(ratio * 255.0, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(scaled, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    return mask.astype(np.uint8)


@dataclass(frozen=True)
class PairScore:
    name: str
    dice: float
    mask_area: float  # foreground share of the conditioning mask


def score_pairs(out_dir: str | Path) -> list[PairScore]:
    """Mask fidelity of every pair a sampling run wrote (``OUT/manifest.jsonl``, images/, masks/), by the colour
    rule, in manifest order."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.jsonl in {out_dir} (not a tutorial_inference.py output folder?)")
    scores = []
    for record in read_manifest(manifest).values():
        image = read_image_rgb(out_dir / record["image"])
        mask = read_mask(out_dir / record["mask"])
        if mask.shape != image.shape[:2]:
            mask = cv2.resize(mask, image.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        scores.append(PairScore(record["name"], dice(segment_generated_lesion(image), mask), float(mask.mean())))
    return scores
