"""Image quality of generated sets: FID, KID, intra-mask diversity and memorisation, on features of local networks
(the images and extractors are in ``siamese.evaluation.features``).

What each measure follows:

* **FID** — Heusel et al. 2017 ("GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium"): the Fréchet distance ``‖μa − μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½)`` between Gaussians fitted to two
  feature sets (unbiased covariances, as pytorch-fid, torch-fidelity and torchmetrics). ``Tr((ΣaΣb)^½)`` is taken as
  ``Σ √λ`` over the eigenvalues of the symmetric PSD matrix ``Σa^½ Σb Σa^½``, which has the same spectrum as
  ``ΣaΣb`` and is stable where ``scipy.linalg.sqrtm`` is not (the tests check both agree).
* **KID** — Bińkowski et al. 2018 ("Demystifying MMD GANs"): the unbiased MMD² estimator with the cubic polynomial
  kernel ``k(x, y) = (xᵀy / d + 1)³``, averaged over random subsets (mean and population std over subsets, as
  torch-fidelity reports them; its defaults: 100 subsets of 1000).
* **Features** — ``inception``: the FID Inception-v3 of torch-fidelity (TensorFlow's 2015-12-05 graph converted to
  PyTorch; torchmetrics' ``FrechetInceptionDistance`` wraps the same network), 2048-d pool features, from a local
  weight file. Domain towers: ``torchvision:<arch>`` (penultimate layer: the last ``nn.Linear`` replaced by the
  identity), ``timm:<name>`` (``num_classes=0``) and ``open_clip:<model>`` (the image tower alone, built from the
  model's config; its embedding is the basis of FD on CLIP features, Kynkäänniemi et al. 2023; OpenAI CLIP's
  normalisation unless ``mean_std`` says otherwise); each from a local weight file read with
  ``ldm.checkpoint.load_state_dict`` (safetensors or ``weights_only`` pickles). ``tiny`` is a seeded random network
  for tests only: its features mean nothing. Nothing here ever downloads weights.
* **Intra-mask diversity** — the mean pairwise cosine distance of the features of the samples generated from one mask
  (and their mean pairwise pixel RMSE on downscaled images), in the spirit of the pairwise-distance diversity scores
  of conditional generation (e.g. Zhu et al. 2017, BicycleGAN, which uses LPIPS). LPIPS itself needs learned linear
  weights that no installed package ships offline, so it is not computed (``ldm.perceptual`` holds only the
  unweighted "baseline" VGG variant, for training).
* **Memorisation** — each synthetic image's nearest real image in feature and pixel space, with near-copy flags
  under thresholds calibrated per tower: ``siamese.evaluation.memorisation`` (its names are importable from here).

Images enter as uint8 RGB H×W×3 arrays or image paths; every extractor resizes to its input size with PIL's
antialiased bicubic filter (the resize Clean-FID, Parmar et al. 2022, recommends), squashing the aspect ratio as the
training data pipeline does, so an image's features never depend on the batch it is in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from siamese.evaluation.calibration import squared_distances as _squared_distances
from siamese.evaluation.calibration import unit_rows

# Memorisation lives in its own module; its names stay importable from here.
from siamese.evaluation.memorisation import (
    COPY_MARGIN,
    DEFAULT_FEATURE_THRESHOLD,
    DEFAULT_PIXEL_THRESHOLD,
    MemorisationReport,
    NearestMatch,
    memorisation,
)

__all__ = [
    "COPY_MARGIN",
    "DEFAULT_FEATURE_THRESHOLD",
    "DEFAULT_PIXEL_THRESHOLD",
    "DiversityResult",
    "KIDResult",
    "MaskDiversity",
    "MemorisationReport",
    "NearestMatch",
    "frechet_distance",
    "intra_mask_diversity",
    "kernel_inception_distance",
    "memorisation",
    "unit_rows",
]

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------------------------------------
# FID and KID
# --------------------------------------------------------------------------------------------------------------------


def _check_features(feats: Any, what: str) -> np.ndarray:
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (samples, features), got shape {array.shape}")
    if array.shape[0] < 2:
        raise ValueError(f"{what}: needs at least 2 samples, got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what}: features contain NaN or infinity")
    return array


def _check_pair(feats_a: Any, feats_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _check_features(feats_a, "feats_a"), _check_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} and {b.shape[1]} (features of one extractor?)")
    return a, b


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(feats_a: Any, feats_b: Any, *, eps: float = 1e-6) -> float:
    """FID (Heusel et al. 2017) between two feature sets (N_a, d) and (N_b, d): ‖μa−μb‖² + Tr(Σa + Σb − 2(ΣaΣb)^½).

    With fewer samples than dimensions + 1 on a side the covariance is singular: ``eps`` is added to both diagonals
    and a warning logged (the value is then dominated by estimation noise; prefer KID or more samples).
    """
    a, b = _check_pair(feats_a, feats_b)
    d = a.shape[1]
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    fewest = min(len(a), len(b))
    if fewest <= d:
        logger.warning("FID: %d samples for %d-dimensional features: the covariance is singular (rank ≤ n − 1 < d); "
                       "computing with eps=%g on its diagonal (unreliable, prefer KID or more samples)", fewest, d, eps)
        cov_a = cov_a + eps * np.eye(d)
        cov_b = cov_b + eps * np.eye(d)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)  # ≥ 0 mathematically; rounding can leave −1e-12 for identical sets


@dataclass(frozen=True)
class KIDResult:
    mean: float
    std: float  # population std over the subsets (torch-fidelity's convention)
    subsets: int
    subset_size: int


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    m = len(x)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(feats_a: Any, feats_b: Any, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> KIDResult:
    """KID (Bińkowski et al. 2018): unbiased MMD² with k(x, y) = (xᵀy/d + 1)³ on ``subsets`` random subsets of
    ``subset_size`` per side (drawn without replacement, seeded); the size is capped at the smaller set with a warning.
    """
    a, b = _check_pair(feats_a, feats_b)
    if subsets < 1:
        raise ValueError(f"KID: subsets must be ≥ 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"KID: subset_size must be ≥ 2, got {subset_size}")
    size = min(subset_size, len(a), len(b))
    if size < subset_size:
        logger.warning("KID: subset_size %d > samples (%d and %d); using subsets of %d", subset_size, len(a), len(b),
                       size)
    rng = np.random.default_rng(seed)
    values = np.array([_unbiased_mmd2(a[rng.choice(len(a), size, replace=False)],
                                      b[rng.choice(len(b), size, replace=False)]) for _ in range(subsets)])
    return KIDResult(float(values.mean()), float(values.std()), subsets, size)


# --------------------------------------------------------------------------------------------------------------------
# Diversity and memorisation
# --------------------------------------------------------------------------------------------------------------------


def _mean_pairwise_cosine(feats: np.ndarray) -> float:
    unit = unit_rows(feats)
    sim = unit @ unit.T
    n = len(feats)
    return float((n * n - sim.sum()) / (n * (n - 1)))  # mean of 1 − cos over ordered pairs i ≠ j (diagonal = 1)


def _mean_pairwise_rmse(pixels: np.ndarray) -> float:
    n = len(pixels)
    rmse = np.sqrt(_squared_distances(pixels, pixels) / pixels.shape[1])
    return float(rmse[~np.eye(n, dtype=bool)].mean())


@dataclass(frozen=True)
class MaskDiversity:
    source: str
    n: int
    feature_cosine: float  # mean pairwise cosine distance of the features
    pixel_rmse: float | None  # mean pairwise RMSE of the downscaled images in [0, 1] (None without pixels)


@dataclass(frozen=True)
class DiversityResult:
    per_mask: list[MaskDiversity]
    mean_feature_cosine: float  # mean over masks (each mask weighs the same); NaN when no mask has ≥ 2 samples
    mean_pixel_rmse: float | None
    skipped_single: int  # masks with a single sample (no pair to compare)


def intra_mask_diversity(features: Any, groups: Sequence[str], pixels: Any = None) -> DiversityResult:
    """Diversity among the samples generated from one mask (``groups``: each sample's mask, the manifest's
    ``source``): mean pairwise cosine distance of ``features`` (N, d) and, given ``pixels`` (N, P) from
    ``pixel_vectors``, mean pairwise pixel RMSE (the L2 distance / √P). Higher = more diverse. LPIPS is not available
    offline (its learned weights are not installed), so no perceptual distance is reported."""
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2:
        raise ValueError(f"diversity: expected features (N, d), got shape {feats.shape}")
    if len(groups) != len(feats):
        raise ValueError(f"diversity: {len(feats)} feature rows but {len(groups)} group labels")
    pix = None if pixels is None else np.asarray(pixels, dtype=np.float64)
    if pix is not None and (pix.ndim != 2 or len(pix) != len(feats)):
        raise ValueError(f"diversity: pixels must be (N={len(feats)}, P), got shape {pix.shape}")
    members: dict[str, list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(str(group), []).append(index)
    per_mask, skipped = [], 0
    for source in sorted(members):
        rows = members[source]
        if len(rows) < 2:
            skipped += 1
            continue
        per_mask.append(MaskDiversity(source, len(rows), _mean_pairwise_cosine(feats[rows]),
                                      None if pix is None else _mean_pairwise_rmse(pix[rows])))
    if skipped:
        logger.info("diversity: %d mask(s) with a single sample skipped", skipped)
    if not per_mask:
        logger.warning("diversity: no mask has two or more samples (sample with k ≥ 2 per mask); nothing to measure")
        return DiversityResult([], math.nan, None if pix is None else math.nan, skipped)
    mean_pix = None if pix is None else float(np.mean([m.pixel_rmse for m in per_mask]))
    return DiversityResult(per_mask, float(np.mean([m.feature_cosine for m in per_mask])), mean_pix, skipped)
