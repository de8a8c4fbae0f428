"""How close two *distinct* real images get: the yardstick for "near-copy", robust to duplicates in the real set.

A generated image that is closer to a real image than any two distinct real images are to each other is a near-copy
(the memorisation screen asks for closer than half that: ``quality.COPY_MARGIN``). Both the MedDiff-FT quality filter
(``siamese.meddiff.filtering``) and the memorisation screen (``siamese.evaluation.quality.memorisation``) take their
near-copy bounds from the real images' leave-one-out nearest-neighbour similarities, in the feature space (or pixel
space) they judge in, so the bound follows the tower instead of being a fixed number that holds for one tower only.

A single leave-one-out extreme is fragile: one picture saved twice under two names (common in collected medical
sets) makes the closest real pair a copy, and the bound becomes "identical" (cosine similarity 1.0), so nothing is
ever a near-copy. So a real image whose leave-one-out nearest neighbour is a near-duplicate in pixels (32×32 gray
thumbnails correlating ≥ ``NEAR_DUPLICATE_CORRELATION``, the leak check's measure: re-saved or rescaled copies
≥ 0.989, distinct demo images ≤ 0.80, ``bench/near_duplicates.py``) is left out of the calibration, and the
duplicates found are reported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from siamese.evaluation.features import ImageLike, _label, _load_rgb

__all__ = ["NEAR_DUPLICATE_CORRELATION", "LeaveOneOut", "cosine_leave_one_out", "leave_one_out", "squared_distances",
           "thumbnail", "unit_rows"]

logger = logging.getLogger(__name__)

NEAR_DUPLICATE_CORRELATION = 0.95  # between the two measured groups above


def thumbnail(image: ImageLike, index: int = 0) -> np.ndarray:
    """The image as a 32×32 gray thumbnail, zero-mean and unit-norm (so a dot product is a correlation)."""
    gray = cv2.cvtColor(_load_rgb(image, index), cv2.COLOR_RGB2GRAY).astype(np.float32)
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).ravel()
    small -= small.mean()
    return small / max(float(np.linalg.norm(small)), 1e-6)


@dataclass(frozen=True)
class LeaveOneOut:
    """Each distinct real image's similarity to its nearest other real image (duplicates left out)."""

    similarity: np.ndarray  # (m,) over the images kept, m ≤ n
    kept: np.ndarray  # (m,) their indices among the n real images
    duplicates: list[tuple[str, str, float]] = field(default_factory=list)  # (image, its copy, thumbnail corr)

    @property
    def largest(self) -> float:
        return float(self.similarity.max())


def unit_rows(feats: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = dot product)."""
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    sq = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * x @ y.T
    return np.clip(sq, 0.0, None)


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"expected features (N, d), got shape {features.shape}")
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if not np.all(norms > 0):
        raise ValueError("a feature vector is all zeros: cosine similarity is undefined")
    return features / norms


def leave_one_out(similarity: np.ndarray, images: Sequence[ImageLike] | None = None, *,
                  threshold: float = NEAR_DUPLICATE_CORRELATION) -> LeaveOneOut:
    """Leave-one-out nearest-neighbour similarity from an n×n similarity matrix of the real images (higher = closer:
    cosine similarity, or a negated distance), leaving out each image whose nearest other image is a near-duplicate
    of it in pixels (``images`` given: thumbnail correlation ≥ ``threshold``). At least two images are needed, and at
    least one must remain."""
    sims = np.array(similarity, dtype=np.float64)
    n = len(sims)
    if sims.shape != (n, n) or n < 2:
        raise ValueError(f"the near-copy calibration needs at least 2 real images, got {n}")
    np.fill_diagonal(sims, -np.inf)
    partner = sims.argmax(axis=1)
    nearest = sims[np.arange(n), partner]
    keep = np.ones(n, bool)
    duplicates: list[tuple[str, str, float]] = []
    if images is not None:
        if len(images) != n:
            raise ValueError(f"{n} similarity rows but {len(images)} images")
        thumbs = np.stack([thumbnail(image, i) for i, image in enumerate(images)])
        corr = (thumbs * thumbs[partner]).sum(axis=1)
        keep = corr < threshold
        duplicates = [(_label(images[i], i), _label(images[int(partner[i])], int(partner[i])), round(float(corr[i]), 4))
                      for i in np.flatnonzero(~keep)]
        if duplicates:
            logger.warning("near-copy calibration: %d real image(s) have a near-duplicate among the real images (e.g. "
                           "%s and %s, thumbnail correlation %.3f); left out of the calibration", len(duplicates),
                           *duplicates[0])
    if not keep.any():
        raise ValueError(f"every one of the {n} real images has a near-duplicate among them: no distinct pair to "
                         "calibrate the near-copy bound on; give the bounds explicitly")
    return LeaveOneOut(nearest[keep], np.flatnonzero(keep), duplicates)


def cosine_leave_one_out(features: np.ndarray, images: Sequence[ImageLike] | None = None) -> LeaveOneOut:
    """``leave_one_out`` of the cosine similarities of ``features`` (N, d)."""
    unit = _unit(features)
    return leave_one_out(unit @ unit.T, images)
