"""Scoring prediction files against ground-truth masks, one folder against another (``tools.score_masks``).

Predictions and ground truths are paired by file stem, optionally after stripping a suffix (``x_pred.png`` ↔
``x.png``); ground truth is read with ``siamese.data.masks.read_mask`` (0/255 and 0/1 label masks both work),
predictions as gray levels at their own depth (8 bit ÷ 255, 16 bit ÷ 65535). The metrics and their conventions are
``siamese.evaluation.metrics``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from siamese.data.images import decode_image
from siamese.data.masks import read_mask
from siamese.data.prepare import list_image_files
from siamese.evaluation.metrics import MaskScores, Thresholds, mask_scores, probability_scores

__all__ = [
    "MaskPair",
    "MaskPairing",
    "is_binary_prediction",
    "pair_masks",
    "prediction_to_probability",
    "read_prediction_gray",
    "score_mask_pairs",
    "score_prediction",
]

logger = logging.getLogger(__name__)

SHOWN = 5  # unmatched file names shown in messages


def read_prediction_gray(path: str | Path) -> np.ndarray:
    """Read a prediction image at its own depth as H×W gray (uint8 or uint16); colour is reduced to luma."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    image = decode_image(np.fromfile(path, dtype=np.uint8), path)
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"prediction {path}: pixel type {image.dtype} is not supported (expected 8- or 16-bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY if image.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    if image.ndim != 2:
        raise ValueError(f"prediction {path}: image shape {image.shape} is not supported")
    return image


def prediction_to_probability(gray: np.ndarray) -> np.ndarray:
    """8-bit ÷ 255, 16-bit ÷ 65535 → float64 in [0, 1]."""
    return gray.astype(np.float64) / float(np.iinfo(gray.dtype).max)


def is_binary_prediction(gray: np.ndarray) -> bool:
    """True when the only values are 0 and the image's maximum (0/255, 0/65535 or 0/1 masks; all-0 or all-max)."""
    values = np.unique(gray)
    return values.size == 1 or (values.size == 2 and values[0] == 0)


def is_mask_levels(gray: np.ndarray) -> bool:
    """True for a mask stored as 0/1 labels or 0/max (8 or 16 bit): a threshold on probabilities does not apply (a
    0/1 label image read as a probability map would be 1/255 everywhere, i.e. empty at every threshold)."""
    values = np.unique(gray)
    top = np.iinfo(gray.dtype).max
    return bool(np.isin(values, (0, 1)).all() or np.isin(values, (0, top)).all())


def _resize_to(gray: np.ndarray, shape: tuple[int, int], binary: bool) -> np.ndarray:
    """Nearest for binary masks (stays binary); area when shrinking probability maps (averages), else linear."""
    height, width = shape
    if binary:
        interpolation = cv2.INTER_NEAREST
    elif height <= gray.shape[0] and width <= gray.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_LINEAR
    return cv2.resize(gray, (width, height), interpolation=interpolation)


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}×{shape[0]}"


def score_prediction(pred_path: str | Path, gt_path: str | Path, threshold: Thresholds = None, *,
                     resize: bool = False) -> MaskScores:
    """Score one prediction file against one ground-truth mask file.

    ``threshold=None``: the prediction must be binary (0 and one other value; foreground = non-zero), else
    ValueError. A float or a sequence of floats: a probability map binarised at ``> threshold`` (a sequence is
    averaged, see :func:`probability_scores`); a prediction that is already a mask (0/1 or 0/max) is scored as one
    at any threshold. ``resize``: a prediction of another size is resized to the ground
    truth's (nearest for binary masks, area/linear for probability maps) instead of raising ValueError.
    """
    pred_path, gt_path = Path(pred_path), Path(gt_path)
    target = read_mask(gt_path)
    gray = read_prediction_gray(pred_path)
    binary = threshold is None or is_mask_levels(gray)
    if binary and not is_binary_prediction(gray):
        values = np.unique(gray)
        raise ValueError(f"prediction {pred_path} is not binary ({values.size} gray levels, "
                         f"{int(values[0])}…{int(values[-1])}): pass --threshold T to binarise probability maps "
                         f"at T, or --sweep for the 0.1…0.9 average")
    if gray.shape != target.shape:
        if not resize:
            raise ValueError(f"prediction {pred_path} is {_size(gray.shape)} but its ground truth {gt_path} is "
                             f"{_size(target.shape)}: pass --resize to resize predictions to the ground-truth size")
        gray = _resize_to(gray, target.shape, binary)
    if binary:
        return mask_scores(gray > 0, target)
    return probability_scores(prediction_to_probability(gray), target, threshold)


@dataclass(frozen=True)
class MaskPair:
    name: str  # the shared stem (suffixes stripped)
    pred: Path
    gt: Path


@dataclass(frozen=True)
class MaskPairing:
    """Prediction/ground-truth pairs by name, and the files on each side without a partner."""

    pairs: list[MaskPair]
    preds_without_gt: list[Path] = field(default_factory=list)
    gts_without_pred: list[Path] = field(default_factory=list)

    def mismatch(self) -> str | None:
        """One line describing the unmatched files on each side (None when every file has a partner)."""
        if not self.preds_without_gt and not self.gts_without_pred:
            return None
        return (f"{len(self.preds_without_gt)} prediction(s) without ground truth ({_names(self.preds_without_gt)}) "
                f"and {len(self.gts_without_pred)} ground-truth mask(s) without prediction "
                f"({_names(self.gts_without_pred)}); {len(self.pairs)} pair(s) match")


def _names(paths: Sequence[Path]) -> str:
    if not paths:
        return "none"
    shown = ", ".join(p.name for p in paths[:SHOWN])
    return shown + (f", … (+{len(paths) - SHOWN})" if len(paths) > SHOWN else "")


def _by_name(files: Sequence[Path], suffix: str, what: str) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in files:
        stem = path.stem
        name = stem[: -len(suffix)] if suffix and stem.endswith(suffix) and len(stem) > len(suffix) else stem
        if name in names:
            raise ValueError(f"{what}: two files have the name '{name}' ({names[name].name}, {path.name}); "
                             f"keep one so each name pairs with one file")
        names[name] = path
    return names


def pair_masks(pred_dir: str | Path, gt_dir: str | Path, pred_suffix: str = "", gt_suffix: str = "") -> MaskPairing:
    """Pair the image files directly inside two folders by stem, after stripping ``pred_suffix`` from prediction
    stems and ``gt_suffix`` from ground-truth stems (where present). Extensions may differ."""
    preds = _by_name(list_image_files(pred_dir, "prediction"), pred_suffix, f"predictions in {pred_dir}")
    gts = _by_name(list_image_files(gt_dir, "ground-truth"), gt_suffix, f"ground truth in {gt_dir}")
    pairs = [MaskPair(name, preds[name], gts[name]) for name in sorted(preds.keys() & gts.keys())]
    return MaskPairing(pairs=pairs,
                       preds_without_gt=[preds[n] for n in sorted(preds.keys() - gts.keys())],
                       gts_without_pred=[gts[n] for n in sorted(gts.keys() - preds.keys())])


def score_mask_pairs(pairs: Sequence[MaskPair], threshold: Thresholds = None, *, resize: bool = False,
                     progress: bool | None = None) -> list[tuple[str, MaskScores]]:
    """(name, scores) of every pair, in order (see :func:`score_prediction`). ``progress``: a tqdm bar (None: only
    on a terminal)."""
    disable = None if progress is None else not progress  # tqdm: None = only on a terminal
    return [(pair.name, score_prediction(pair.pred, pair.gt, threshold, resize=resize))
            for pair in tqdm(pairs, desc="scoring", unit="image", disable=disable)]
