"""Mask fidelity of generated pairs: segment each generated image and compare with the mask it was conditioned on.

The morphological fidelity Siamese-Diffusion claims to improve is measured as the Dice overlap between a
segmentation of the generated image and its conditioning mask. This module re-exports that measure (``dice``, from
``siamese.evaluation.metrics``) and holds, for the framework's own generated lesion domain
(``siamese.data.synthetic_pair``), a documented colour rule that segments it without any trained network: lesions
are redder than the surrounding tissue, so the green/red ratio is lower inside them. The rule
(``segment_generated_lesion``): G/R per pixel (+1 to avoid division by zero), Gaussian blur with σ = 1 px, Otsu's
threshold per image, foreground = the low-ratio side. On real generated images at 64 px it reaches a mean Dice ≈
0.96 against the true masks (``tests/test_fidelity.py`` checks ≥ 0.9), and ≈ 0.15 on noise. It is meaningful only
for that domain; real data needs a segmenter trained on the real pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from siamese.data.images import read_image_rgb
from siamese.data.masks import read_mask
from siamese.data.pairs import conditioning_mask_path, read_manifest
from siamese.evaluation.metrics import dice

__all__ = ["PairScore", "colour_rule", "dice", "score_pairs", "segment_generated_lesion", "segmenter_rule"]


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
    dice: float  # against the mask the image was generated from (the conditioning mask)
    mask_area: float  # foreground share of the conditioning mask
    label_dice: float | None = None  # against the saved label, when it differs (eroded pairs); None otherwise


Segment = Callable[[list[np.ndarray]], list[np.ndarray]]
"""Images (uint8 RGB) → {0, 1} lesion masks at each image's size."""


def colour_rule(images: list[np.ndarray]) -> list[np.ndarray]:
    return [segment_generated_lesion(image) for image in images]


def segmenter_rule(model, cfg, device: str = "cpu") -> Segment:
    """A trained segmenter (``siamese.evaluation.segmenter``) as a ``Segment`` function (threshold ``cfg``)."""
    from siamese.evaluation.segmenter import predict

    def segment(images: list[np.ndarray]) -> list[np.ndarray]:
        return [(p > cfg.threshold).astype(np.uint8) for p in predict(model, images, cfg, device=device)]

    return segment


def _mask_at(path: Path, shape: tuple[int, int]) -> np.ndarray:
    mask = read_mask(path)
    if mask.shape != shape:
        mask = cv2.resize(mask, shape[::-1], interpolation=cv2.INTER_NEAREST)
    return mask


def score_pairs(out_dir: str | Path, segment: Segment = colour_rule, batch: int = 32) -> list[PairScore]:
    """Mask fidelity of every pair a sampling run wrote (``OUT/manifest.jsonl``, images/, masks/), in manifest order:
    Dice between ``segment`` of each generated image (default: the colour rule of the generated domain; a segmenter
    trained on the real pairs for real data, ``segmenter_rule``) and the mask it was conditioned on: for pairs whose
    label was eroded (``--erode``, ``tools.erode_masks``) that is the recorded ``conditioning_mask``, and the Dice
    against the eroded label is kept beside it (``label_dice``)."""
    out_dir = Path(out_dir)
    manifest = out_dir / "manifest.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"no manifest.jsonl in {out_dir} (not a tutorial_inference.py output folder?)")
    records = list(read_manifest(manifest).values())
    scores = []
    for start in range(0, len(records), batch):
        chunk = records[start:start + batch]
        images = [read_image_rgb(out_dir / r["image"]) for r in chunk]
        for record, image, predicted in zip(chunk, images, segment(images)):
            conditioning = conditioning_mask_path(record, out_dir)
            mask = _mask_at(conditioning, image.shape[:2])
            label = None
            if conditioning != out_dir / record["mask"]:
                label = dice(predicted, _mask_at(out_dir / record["mask"], image.shape[:2]))
            scores.append(PairScore(record["name"], dice(predicted, mask), float(mask.mean()), label))
    return scores
