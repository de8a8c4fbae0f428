"""Memorisation: each synthetic image's nearest real image in feature space (cosine, as the replication study of
Somepalli et al. 2023, "Diffusion Art or Digital Forgery?") and in pixel space (L2 on downscaled images, as Carlini et
al. 2023, "Extracting Training Data from Diffusion Models"), searched over the real training *and* test images, with
near-copy flags that are screens for human review, not proofs. By default the thresholds are calibrated on the real
images themselves, per feature tower (``siamese.evaluation.calibration``): a synthetic image is flagged when it is
closer to a real image than ``COPY_MARGIN`` (½) of the smallest leave-one-out nearest-neighbour distance between
distinct real images (near-duplicate real pairs left out). Fixed thresholds (``DEFAULT_FEATURE_THRESHOLD`` /
``DEFAULT_PIXEL_THRESHOLD``) hold for one tower only: with the framework's own ``first_stage`` features, 23 of 40
distinct demo test images fall under the fixed feature threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from siamese.data.images import write_png
from siamese.evaluation.calibration import cosine_leave_one_out, leave_one_out, squared_distances, unit_rows
from siamese.evaluation.features import DEFAULT_PIXEL_SIZE, ImageLike, _label, _load_rgb, _resize, pixel_vectors

__all__ = ["COPY_MARGIN", "DEFAULT_FEATURE_THRESHOLD", "DEFAULT_PIXEL_THRESHOLD", "MemorisationReport",
           "NearestMatch", "memorisation"]

logger = logging.getLogger(__name__)

# Fixed near-copy thresholds, for a user who sets them (the default calibrates them on the real images). Feature
# cosine distance 0.02 (cosine similarity > 0.98): re-encodings, slight crops or
# colour shifts of one image stay above 0.98 in Inception/CLIP pool features, while distinct images of one domain are
# typically ≥ 0.1 apart. Pixel RMSE 0.03 on [0, 1] at 64×64 (≈ 7.7 gray levels, PSNR > 30 dB): what JPEG or
# resampling leaves of a copy, and far below the RMSE of two different photographs of the same organ. Both depend on
# the domain and the extractor: calibrate on known pairs (e.g. training images vs their own augmentations).
DEFAULT_FEATURE_THRESHOLD = 0.02
DEFAULT_PIXEL_THRESHOLD = 0.03
# Calibrated thresholds: this share of the smallest leave-one-out distance between distinct real images. Measured
# on the demo data (200 pairs, seed 0, 20 % test; ``python bench/memorisation_calibration.py``, its docstring has the
# commands): with ½, 0 of 40 distinct test images and 120 of 120 re-saved copies (JPEG q70, rescaled 1.5×) of
# training images are flagged, for the ``first_stage`` and ``tiny`` towers; with 1 (the bare minimum), 1 of 40
# distinct images is flagged too; the fixed thresholds flag 23 of 40 distinct images with ``first_stage``.
COPY_MARGIN = 0.5


@dataclass(frozen=True)
class NearestMatch:
    synthetic: str
    feature_nearest: str  # the training image nearest in feature space (cosine)
    feature_distance: float  # 1 − cosine similarity
    pixel_nearest: str  # the training image nearest in pixel space
    pixel_rmse: float  # RMSE on the downscaled images in [0, 1]
    feature_flag: bool
    pixel_flag: bool
    score: float  # min(feature_distance / feature threshold, pixel_rmse / pixel threshold): < 1 ⇔ flagged
    synthetic_index: int
    feature_index: int
    pixel_index: int
    feature_split: str | None = None  # the split ("train", "test") of the feature-space nearest image, when known
    pixel_split: str | None = None

    @property
    def flagged(self) -> bool:
        return self.feature_flag or self.pixel_flag

    @property
    def flagged_test(self) -> bool:
        """A near-copy of a *test* image: a generator saw it, or the test set duplicates a training image."""
        return (self.feature_flag and self.feature_split == "test") or (self.pixel_flag and self.pixel_split == "test")


_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 100)


@dataclass
class MemorisationReport:
    """Nearest training image of every synthetic image, sorted closest first (by ``NearestMatch.score``)."""

    matches: list[NearestMatch]
    feature_threshold: float
    pixel_threshold: float
    synthetic_images: Sequence[ImageLike] = field(repr=False)
    training_images: Sequence[ImageLike] = field(repr=False)
    thresholds_from: dict[str, str] = field(default_factory=dict)  # per space: "given" or how it was calibrated
    calibration_duplicates: list[tuple[str, str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-able: counts flagged per space, thresholds, percentiles of both distance distributions."""
        feature = np.array([m.feature_distance for m in self.matches])
        pixel = np.array([m.pixel_rmse for m in self.matches])
        return {
            "n_synthetic": len(self.matches),
            "n_training": len(self.training_images),
            "feature_threshold": self.feature_threshold,
            "pixel_threshold": self.pixel_threshold,
            "thresholds_from": dict(self.thresholds_from),
            "calibration_duplicates": [list(d) for d in self.calibration_duplicates[:10]],
            "flagged_feature": int(sum(m.feature_flag for m in self.matches)),
            "flagged_pixel": int(sum(m.pixel_flag for m in self.matches)),
            "flagged_any": int(sum(m.flagged for m in self.matches)),
            "flagged_test": int(sum(m.flagged_test for m in self.matches)),
            "feature_distance_percentiles": {f"p{q}": float(np.percentile(feature, q)) for q in _PERCENTILES},
            "pixel_rmse_percentiles": {f"p{q}": float(np.percentile(pixel, q)) for q in _PERCENTILES},
            "closest": [{"synthetic": m.synthetic, "feature_nearest": m.feature_nearest,
                         "feature_distance": m.feature_distance, "pixel_nearest": m.pixel_nearest,
                         "pixel_rmse": m.pixel_rmse, "flagged": m.flagged, "flagged_test": m.flagged_test}
                        for m in self.matches[:10]],
        }

    def write_nearest_pairs_png(self, path: str | Path, worst_k: int = 16, cell: int = 160) -> Path:
        """The ``worst_k`` closest pairs, one row each: synthetic | nearest training image (in the space that decided
        the score), the distances written under them; written atomically. Returns the path."""
        if worst_k < 1:
            raise ValueError(f"worst_k must be ≥ 1, got {worst_k}")
        path = Path(path)
        rows = []
        for match in self.matches[:worst_k]:
            by_feature = match.feature_distance / self.feature_threshold <= match.pixel_rmse / self.pixel_threshold
            train_index = match.feature_index if by_feature else match.pixel_index
            synth = _resize(_load_rgb(self.synthetic_images[match.synthetic_index], match.synthetic_index), cell, cell)
            train = _resize(_load_rgb(self.training_images[train_index], train_index), cell, cell)
            pair = np.concatenate([synth, train], axis=1)
            caption = np.full((34, pair.shape[1], 3), 255 if match.flagged else 40, np.uint8)
            if match.flagged:
                caption[..., 1:] = 60  # red strip for a flagged near-copy
            train_label = Path(_label(self.training_images[train_index], train_index)).name
            line1 = f"{'FLAG ' if match.flagged else ''}{Path(match.synthetic).name[:18]} | {train_label[:18]}"
            line2 = f"feat cos {match.feature_distance:.4f}  pix rmse {match.pixel_rmse:.4f}"
            for row, text in enumerate((line1, line2)):
                cv2.putText(caption, text, (4, 13 + 16 * row), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1,
                            cv2.LINE_AA)
            rows.append(np.concatenate([pair, caption], axis=0))
        if not rows:
            raise ValueError("no matches to draw")
        write_png(path, np.concatenate(rows, axis=0))
        return path


def _rmse_matrix(a: np.ndarray, b: np.ndarray, chunk: int = 256) -> np.ndarray:
    return np.concatenate([np.sqrt(squared_distances(a[i:i + chunk], b) / a.shape[1])
                           for i in range(0, len(a), chunk)]) if len(a) else np.zeros((0, len(b)))


def memorisation(synthetic_images: Sequence[ImageLike], training_images: Sequence[ImageLike], *,
                 synthetic_features: Any, training_features: Any, synthetic_pixels: Any = None,
                 training_pixels: Any = None, pixel_size: int = DEFAULT_PIXEL_SIZE,
                 feature_threshold: float | None = None, pixel_threshold: float | None = None,
                 training_splits: Sequence[str] | None = None, chunk: int = 256) -> MemorisationReport:
    """For each synthetic image its nearest real image by feature cosine distance and by pixel RMSE (images
    downscaled to ``pixel_size``², computed here unless the ``*_pixels`` from ``pixel_vectors`` are given), flagged as
    a near-copy when closer than ``feature_threshold`` / ``pixel_threshold``. ``training_images`` are the real images
    searched (give the training *and* test split, with ``training_splits`` naming each one's split, so copies of test
    images are found and counted apart). A threshold left ``None`` is calibrated on those real images
    (``siamese.evaluation.calibration``): ``COPY_MARGIN`` × the smallest leave-one-out nearest-neighbour distance
    between distinct real images, in that space. Images (paths or arrays) are kept to draw
    ``MemorisationReport.write_nearest_pairs_png``."""
    for name, value in (("feature", feature_threshold), ("pixel", pixel_threshold)):
        if value is not None and value <= 0:
            raise ValueError(f"the {name} threshold must be positive, got {value}")
    if not len(synthetic_images) or not len(training_images):
        raise ValueError(f"memorisation: needs synthetic and training images, got {len(synthetic_images)} and "
                         f"{len(training_images)}")
    if training_splits is not None and len(training_splits) != len(training_images):
        raise ValueError(f"memorisation: {len(training_images)} real images but {len(training_splits)} split labels")
    s_feat = np.asarray(synthetic_features, dtype=np.float64)
    t_feat = np.asarray(training_features, dtype=np.float64)
    for what, feats, images in (("synthetic", s_feat, synthetic_images), ("training", t_feat, training_images)):
        if feats.ndim != 2 or len(feats) != len(images):
            raise ValueError(f"memorisation: {what} features must be ({len(images)}, d), got shape {feats.shape}")
    if s_feat.shape[1] != t_feat.shape[1]:
        raise ValueError(f"memorisation: feature dimensions differ: {s_feat.shape[1]} and {t_feat.shape[1]}")
    s_pix = pixel_vectors(synthetic_images, pixel_size) if synthetic_pixels is None else np.asarray(synthetic_pixels)
    t_pix = pixel_vectors(training_images, pixel_size) if training_pixels is None else np.asarray(training_pixels)
    if s_pix.shape[1] != t_pix.shape[1] or len(s_pix) != len(s_feat) or len(t_pix) != len(t_feat):
        raise ValueError(f"memorisation: pixel arrays {s_pix.shape} and {t_pix.shape} do not fit the images")
    s_unit, t_unit = unit_rows(s_feat), unit_rows(t_feat)
    sources = {"feature": "given", "pixel": "given"}
    duplicates: list[tuple[str, str, float]] = []
    if feature_threshold is None:
        loo = cosine_leave_one_out(t_feat, training_images)
        feature_threshold = max(COPY_MARGIN * (1.0 - loo.largest), 1e-9)
        duplicates = loo.duplicates
        sources["feature"] = (f"{COPY_MARGIN:g} × smallest leave-one-out distance of {len(loo.kept)} distinct real "
                              "images")
    if pixel_threshold is None:
        loo = leave_one_out(-_rmse_matrix(t_pix, t_pix, chunk), training_images)
        pixel_threshold = max(COPY_MARGIN * -loo.largest, 1e-9)
        duplicates = duplicates or loo.duplicates
        sources["pixel"] = f"{COPY_MARGIN:g} × smallest leave-one-out RMSE of {len(loo.kept)} distinct real images"
    split = (lambda i: None) if training_splits is None else (lambda i: str(training_splits[i]))
    matches = []
    for start in range(0, len(s_feat), chunk):
        stop = min(start + chunk, len(s_feat))
        cosine = 1.0 - s_unit[start:stop] @ t_unit.T
        rmse = np.sqrt(squared_distances(s_pix[start:stop], t_pix) / s_pix.shape[1])
        for row in range(stop - start):
            fi, pi = int(np.argmin(cosine[row])), int(np.argmin(rmse[row]))
            fd, pd = max(float(cosine[row, fi]), 0.0), float(rmse[row, pi])
            i = start + row
            matches.append(NearestMatch(
                _label(synthetic_images[i], i), _label(training_images[fi], fi), fd, _label(training_images[pi], pi),
                pd, fd < feature_threshold, pd < pixel_threshold, min(fd / feature_threshold, pd / pixel_threshold),
                i, fi, pi, split(fi), split(pi)))
    matches.sort(key=lambda m: (m.score, m.synthetic_index))
    report = MemorisationReport(matches, feature_threshold, pixel_threshold, synthetic_images, training_images,
                                sources, duplicates)
    flagged = sum(m.flagged for m in matches)
    if flagged:
        logger.warning("memorisation: %d of %d synthetic images are near-copies of real images (feature cosine "
                       "distance < %.4g or pixel RMSE < %.4g)", flagged, len(matches), feature_threshold,
                       pixel_threshold)
    flagged_test = sum(m.flagged_test for m in matches)
    if flagged_test:
        logger.warning("memorisation: %d synthetic images are near-copies of TEST images: a generator saw test data, "
                       "or the test split duplicates training images", flagged_test)
    return report
