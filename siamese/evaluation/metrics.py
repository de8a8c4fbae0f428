"""Per-image segmentation metrics on binary masks: Dice, IoU, precision, recall and HD95, plus folder scoring.

What the segmentation tables of Siamese-Diffusion and the systems it compares with report, computed per image and
then averaged over images (mean ± population standard deviation). For a prediction P and a ground truth G (binary
H×W; any non-zero value is foreground):

- Dice ``2|P∩G| / (|P| + |G|)``, IoU (Jaccard) ``|P∩G| / |P∪G|``, precision ``|P∩G| / |P|``, recall ``|P∩G| / |G|``.
- HD95, in pixels: the symmetric 95th-percentile Hausdorff distance as MONAI defines it
  (``monai.metrics.compute_hausdorff_distance(..., percentile=95)``, ``directed=False``): the surface of a mask is
  its foreground pixels with a 4-connected background neighbour (outside the image counts as background; MONAI's
  ``binary_erosion`` XOR mask), each surface pixel's distance is the Euclidean distance between pixel centres to the
  nearest surface pixel of the other mask, and HD95 = max(P95 of the distances P→G, P95 of G→P), percentiles with
  linear interpolation. It is computed here with scipy's exact distance transform (MONAI's import takes seconds);
  ``tests/test_metrics.py`` checks it against explicit point sets and, in the slow suite, against MONAI. (medpy's
  ``hd95`` takes the percentile of the two directions pooled instead, which can differ slightly.)

Conventions for empty masks (tested): both empty → Dice = IoU = precision = recall = 1 and HD95 = 0 (a correct
"no lesion"); exactly one empty → Dice = IoU = precision = recall = 0 (the undefined ratio, e.g. precision of an
empty prediction, counts as 0) and HD95 = NaN: *undefined*, left out of the HD95 mean and counted separately.

Probability maps (values in [0, 1]) are binarised as ``probability > threshold`` (strictly greater: at 0 every
non-zero pixel is foreground), at one threshold, or by GuidedDiff's protocol (after MedSegDiff's evaluation): each
metric averaged over the thresholds 0.1, 0.2, …, 0.9 (``SWEEP_THRESHOLDS``). In the average an image's HD95 is the
mean over the thresholds where it is defined, and undefined only when it is undefined at every threshold.

Folder scoring (prediction files against ground-truth files) is in ``siamese.evaluation.scoring``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "METRICS",
    "MaskScores",
    "MetricSummary",
    "SWEEP_THRESHOLDS",
    "dice",
    "format_summary",
    "hd95",
    "iou",
    "iou_matrix",
    "mask_scores",
    "precision",
    "probability_scores",
    "recall",
    "summarize",
]

logger = logging.getLogger(__name__)

METRICS = ("dice", "iou", "precision", "recall", "hd95")
# GuidedDiff's threshold sweep; i / 10 is the double nearest to the decimal, so 8-bit levels such as 51/255 (= 0.2)
# compare with these exactly as the decimals would.
SWEEP_THRESHOLDS: tuple[float, ...] = tuple(i / 10 for i in range(1, 10))
HD95_PERCENTILE = 95.0

Thresholds = float | Sequence[float] | None


# ------------------------------------------------------------------------------------------ per-image metrics


def _binary_pair(pred: np.ndarray, target: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"{what}: masks of different shapes {pred.shape} and {target.shape}")
    if pred.ndim == 0:
        raise ValueError(f"{what}: masks must be arrays (H×W), got scalars")
    return pred.astype(bool), target.astype(bool)


def _counts(p: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    """(|P∩G|, |P|, |G|)."""
    return int(np.count_nonzero(p & t)), int(np.count_nonzero(p)), int(np.count_nonzero(t))


def _ratio(numerator: int, denominator: int, both_empty: bool) -> float:
    if both_empty:
        return 1.0
    return numerator / denominator if denominator else 0.0


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice overlap ``2|P∩T| / (|P| + |T|)`` of two binary masks; two empty masks agree perfectly (1.0)."""
    inter, n_pred, n_target = _counts(*_binary_pair(pred, target, "dice"))
    return _ratio(2 * inter, n_pred + n_target, n_pred + n_target == 0)


def iou(pred: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union (Jaccard) ``|P∩T| / |P∪T|``; two empty masks → 1.0."""
    inter, n_pred, n_target = _counts(*_binary_pair(pred, target, "iou"))
    return _ratio(inter, n_pred + n_target - inter, n_pred + n_target == 0)


def iou_matrix(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """IoU of every mask of ``pred`` (N×H×W) with every mask of ``target`` (M×H×W): N×M, by the same formula and
    empty-mask convention as ``iou`` (two empty masks → 1.0), from one matrix product of the flattened masks."""
    p = np.asarray(pred).reshape(len(pred), -1).astype(bool).astype(np.float32)
    t = np.asarray(target).reshape(len(target), -1).astype(bool).astype(np.float32)
    if p.shape[1] != t.shape[1]:
        raise ValueError(f"iou_matrix: masks of different sizes {np.shape(pred)[1:]} and {np.shape(target)[1:]}")
    inter = (p @ t.T).astype(np.float64)  # exact: integer counts below 2**24 per mask
    union = p.sum(1)[:, None].astype(np.float64) + t.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


def precision(pred: np.ndarray, target: np.ndarray) -> float:
    """``|P∩T| / |P|``; both empty → 1.0, an empty prediction against a non-empty target → 0.0."""
    inter, n_pred, n_target = _counts(*_binary_pair(pred, target, "precision"))
    return _ratio(inter, n_pred, n_pred + n_target == 0)


def recall(pred: np.ndarray, target: np.ndarray) -> float:
    """``|P∩T| / |T|``; both empty → 1.0, an empty target against a non-empty prediction → 0.0."""
    inter, n_pred, n_target = _counts(*_binary_pair(pred, target, "recall"))
    return _ratio(inter, n_target, n_pred + n_target == 0)


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as error:  # scipy is in the "eval" extra; Dice & co. do not need it
        raise ImportError("HD95 needs scipy: pip install -e '.[eval]' (or pip install scipy)") from error
    return ndimage


def _hd95_bool(p: np.ndarray, t: np.ndarray) -> float:
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if not has_p or not has_t:
        return math.nan
    ndimage = _ndimage()
    # Crop to the union's bounding box with a 1-pixel margin (as MONAI does): every surface pixel, hence every
    # nearest neighbour, lies inside it, so the distances are unchanged and the transforms are smaller.
    coords = np.nonzero(p | t)
    box = tuple(slice(max(int(c.min()) - 1, 0), int(c.max()) + 2) for c in coords)
    p, t = p[box], t[box]
    # Surface: foreground pixels that erosion (4-connected cross, outside = background) removes.
    surface_p = p & ~ndimage.binary_erosion(p, border_value=0)
    surface_t = t & ~ndimage.binary_erosion(t, border_value=0)
    # distance_transform_edt(~S) is, at every pixel, the exact Euclidean distance to the nearest pixel of S.
    p_to_t = ndimage.distance_transform_edt(~surface_t)[surface_p]
    t_to_p = ndimage.distance_transform_edt(~surface_p)[surface_t]
    return float(max(np.percentile(p_to_t, HD95_PERCENTILE), np.percentile(t_to_p, HD95_PERCENTILE)))


def hd95(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance in pixels (MONAI's definition, see the module docstring).

    Both masks empty → 0.0; exactly one empty → NaN (undefined). Needs scipy.
    """
    return _hd95_bool(*_binary_pair(pred, target, "hd95"))


@dataclass(frozen=True)
class MaskScores:
    """The five metrics of one image; ``hd95`` is NaN where undefined (exactly one mask empty)."""

    dice: float
    iou: float
    precision: float
    recall: float
    hd95: float

    @property
    def hd95_defined(self) -> bool:
        return not math.isnan(self.hd95)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def mask_scores(pred: np.ndarray, target: np.ndarray) -> MaskScores:
    """All five metrics of a binary prediction against a binary target (same shape; non-zero = foreground)."""
    p, t = _binary_pair(pred, target, "mask_scores")
    inter, n_pred, n_target = _counts(p, t)
    both_empty = n_pred + n_target == 0
    return MaskScores(
        dice=_ratio(2 * inter, n_pred + n_target, both_empty),
        iou=_ratio(inter, n_pred + n_target - inter, both_empty),
        precision=_ratio(inter, n_pred, both_empty),
        recall=_ratio(inter, n_target, both_empty),
        hd95=_hd95_bool(p, t),
    )


def _check_threshold(value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"threshold {value} must lie in [0, 1] (a probability)")
    return value


def _threshold_list(threshold: float | Sequence[float]) -> list[float]:
    values = [threshold] if np.isscalar(threshold) else list(threshold)
    if not values:
        raise ValueError("no thresholds given")
    return [_check_threshold(v) for v in values]


def _average(scores: Sequence[MaskScores]) -> MaskScores:
    if len(scores) == 1:
        return scores[0]
    defined = [s.hd95 for s in scores if s.hd95_defined]
    return MaskScores(
        dice=float(np.mean([s.dice for s in scores])),
        iou=float(np.mean([s.iou for s in scores])),
        precision=float(np.mean([s.precision for s in scores])),
        recall=float(np.mean([s.recall for s in scores])),
        hd95=float(np.mean(defined)) if defined else math.nan,
    )


def probability_scores(prob: np.ndarray, target: np.ndarray,
                       threshold: float | Sequence[float] = SWEEP_THRESHOLDS) -> MaskScores:
    """Metrics of a probability map (values in [0, 1]) binarised as ``prob > threshold``.

    ``threshold`` is one value, or several (default: GuidedDiff's 0.1 … 0.9) whose metrics are averaged; HD95 is
    averaged over the thresholds where it is defined (NaN if it is defined at none).
    """
    prob = np.asarray(prob, dtype=np.float64)
    thresholds = _threshold_list(threshold)
    if prob.size and not (np.isfinite(prob).all() and prob.min() >= 0.0 and prob.max() <= 1.0):
        raise ValueError(f"probability map values must lie in [0, 1], found [{np.nanmin(prob):g}, {np.nanmax(prob):g}]"
                         + ("" if np.isfinite(prob).all() else " and non-finite values"))
    return _average([mask_scores(prob > t, target) for t in thresholds])


# ------------------------------------------------------------------------------------------ summaries


@dataclass(frozen=True)
class MetricSummary:
    """Mean ± population standard deviation over the images where the metric is defined (``n`` of them);
    ``undefined``: images left out (HD95 with exactly one mask empty). NaN mean/std when ``n`` is 0."""

    mean: float
    std: float
    n: int
    undefined: int

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready: NaN becomes None (null)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def summarize(scores: Iterable[MaskScores]) -> dict[str, MetricSummary]:
    """Per-metric mean ± std over images (NaN-aware: undefined values are left out and counted)."""
    table = np.array([[getattr(s, m) for m in METRICS] for s in scores], dtype=np.float64).reshape(-1, len(METRICS))
    if not len(table):
        raise ValueError("no images to summarise")
    out = {}
    for column, name in enumerate(METRICS):
        values = table[:, column]
        defined = values[~np.isnan(values)]
        out[name] = MetricSummary(mean=float(defined.mean()) if defined.size else math.nan,
                                  std=float(defined.std()) if defined.size else math.nan,
                                  n=int(defined.size), undefined=int(values.size - defined.size))
    return out


def format_summary(summary: dict[str, MetricSummary]) -> str:
    """A plain-text table, one row per metric: mean ± std, the images it averages, and undefined HD95."""
    lines = [f"{'METRIC':<11}{'MEAN ± STD':<22}IMAGES"]
    for name in METRICS:
        s = summary[name]
        label = "hd95 (px)" if name == "hd95" else name
        value = "undefined" if s.n == 0 else f"{s.mean:.4f} ± {s.std:.4f}"
        note = f" ({s.undefined} undefined: exactly one mask empty)" if s.undefined else ""
        lines.append(f"{label:<11}{value:<22}{s.n}{note}")
    return "\n".join(lines) + "\n"
