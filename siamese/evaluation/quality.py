"""Image quality of generated sets: FID, KID, intra-mask diversity and memorisation, on features of local networks.

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
* **Memorisation** — nearest training image per synthetic image in feature space (cosine, as the replication study
  of Somepalli et al. 2023, "Diffusion Art or Digital Forgery?") and in pixel space (L2 on downscaled images, as
  Carlini et al. 2023, "Extracting Training Data from Diffusion Models"), with near-copy flags under thresholds that
  are screens for human review, not proofs (see ``DEFAULT_FEATURE_THRESHOLD`` / ``DEFAULT_PIXEL_THRESHOLD``).

Images enter as uint8 RGB H×W×3 arrays or image paths; every extractor resizes to its input size with PIL's
antialiased bicubic filter (the resize Clean-FID, Parmar et al. 2022, recommends), squashing the aspect ratio as the
training data pipeline does, so an image's features never depend on the batch it is in.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ldm.checkpoint import CheckpointKeyError, filter_prefix, load_state_dict, load_strict

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from siamese.data import PROMPT_FILE, read_image_rgb, read_prompt_jsonl
from siamese.pairs_io import MANIFEST_NAME, read_manifest, write_png_atomic

__all__ = [
    "DEFAULT_FEATURE_THRESHOLD",
    "DEFAULT_PIXEL_THRESHOLD",
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_FILE",
    "DiversityResult",
    "FeatureExtractor",
    "KIDResult",
    "MaskDiversity",
    "MemorisationReport",
    "NearestMatch",
    "RunImage",
    "equal_count",
    "frechet_distance",
    "intra_mask_diversity",
    "kernel_inception_distance",
    "load_feature_extractor",
    "memorisation",
    "pixel_vectors",
    "read_dataset_images",
    "read_run_images",
]

logger = logging.getLogger(__name__)

ImageLike = str | Path | np.ndarray

# torch-fidelity's FID Inception-v3 ("pt_inception-2015-12-05"); the same file torchmetrics' FID loads.
INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_SIZE = 299

# Near-copy thresholds. Feature cosine distance 0.02 (cosine similarity > 0.98): re-encodings, slight crops or
# colour shifts of one image stay above 0.98 in Inception/CLIP pool features, while distinct images of one domain are
# typically ≥ 0.1 apart. Pixel RMSE 0.03 on [0, 1] at 64×64 (≈ 7.7 gray levels, PSNR > 30 dB): what JPEG or
# resampling leaves of a copy, and far below the RMSE of two different photographs of the same organ. Both depend on
# the domain and the extractor: calibrate on known pairs (e.g. training images vs their own augmentations).
DEFAULT_FEATURE_THRESHOLD = 0.02
DEFAULT_PIXEL_THRESHOLD = 0.03
DEFAULT_PIXEL_SIZE = 64

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_TINY_SIZE = 32


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _load_rgb(image: ImageLike, index: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image #{index}: expected a uint8 RGB array H×W×3, got {image.dtype} {image.shape}")
        return image
    if isinstance(image, (str, Path)):
        return read_image_rgb(image)
    raise TypeError(f"image #{index}: expected a uint8 RGB array or an image path, got {type(image).__name__}")


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def _label(image: ImageLike, index: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"#{index}"


def pixel_vectors(images: Sequence[ImageLike], size: int = DEFAULT_PIXEL_SIZE, gray: bool = False) -> np.ndarray:
    """Images downscaled to ``size``×``size`` (``cv2.INTER_AREA``: an average, no aliasing), in [0, 1], flattened:
    float32 (N, size²·3), or (N, size²) with ``gray``."""
    if size <= 0:
        raise ValueError(f"pixel size must be positive, got {size}")
    rows = []
    for index, image in enumerate(images):
        rgb = _load_rgb(image, index)
        shrinking = rgb.shape[0] >= size and rgb.shape[1] >= size
        small = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
        if gray:
            small = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        rows.append(small.reshape(-1).astype(np.float32) / np.float32(255.0))
    if not rows:
        raise ValueError("pixel_vectors: no images")
    return np.stack(rows)


# --------------------------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """A frozen network and its preprocessing: ``features(images)`` → float64 (N, d).

    ``uint8_input``: the network takes uint8 RGB B×3×H×W as is (torch-fidelity's Inception normalises inside);
    otherwise images are scaled to [0, 1] and normalised with ``mean``/``std``.
    """

    spec: str
    module: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    uint8_input: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _dim: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device).eval().requires_grad_(False)

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Move the network to ``device`` (features are computed there)."""
        self.device = torch.device(device)
        self.module = self.module.to(self.device)
        return self

    def _batch(self, rgbs: list[np.ndarray]) -> Tensor:
        height, width = self.input_size
        array = np.stack([_resize(rgb, height, width) for rgb in rgbs]).transpose(0, 3, 1, 2)
        batch = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        if self.uint8_input:
            return batch
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def _forward(self, batch: Tensor) -> Tensor:
        out = self.module(batch)
        if isinstance(out, (tuple, list)):  # torch-fidelity returns one tensor per requested feature
            out = out[0]
        return out.reshape(out.shape[0], -1)

    @torch.no_grad()
    def features(self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool = True) -> np.ndarray:
        """Features of uint8 RGB H×W×3 arrays or image paths, in order: float64 (N, d)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(images) == 0:
            raise ValueError(f"{self.spec}: no images to extract features from")
        chunks = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"features {self.spec}", unit="batch", disable=not progress, leave=False):
            rgbs = [_load_rgb(image, start + i) for i, image in enumerate(images[start:start + batch_size])]
            chunks.append(self._forward(self._batch(rgbs)).double().cpu().numpy())
        feats = np.concatenate(chunks)
        self._dim = feats.shape[1]
        if not np.isfinite(feats).all():
            raise ValueError(f"{self.spec}: the network produced non-finite features (broken weights?)")
        return feats

    @property
    def dim(self) -> int:
        """Feature dimension (one forward pass of a blank image the first time, unless features ran before)."""
        if self._dim is None:
            self.features([np.zeros((*self.input_size, 3), np.uint8)], progress=False)
        assert self._dim is not None
        return self._dim


def _tiny_network(seed: int) -> nn.Module:
    """Seeded random network for TESTS ONLY (its features carry no meaning): per-image channel normalisation, a
    bias-free patchify conv, tanh, 4×4 pooling and a bias-free projection to 64 signed dimensions, so that distinct
    images of one colour scheme still get clearly different feature directions."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return nn.Sequential(nn.InstanceNorm2d(3), nn.Conv2d(3, 16, 4, stride=4, bias=False), nn.Tanh(),
                             nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 16, 64, bias=False))
    finally:
        torch.random.set_rng_state(generator_state)


def _inception_class() -> type[nn.Module]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _InceptionFromStateDict(FeatureExtractorInceptionV3):
        """torch-fidelity's FID Inception-v3, built with random weights that the caller then replaces: its own loader
        either downloads or unpickles the file with ``weights_only=False``; ours goes through ldm.checkpoint."""

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
            if not state_dict:  # the empty placeholder handed to __init__
                return nn.modules.module._IncompatibleKeys([], [])
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return _InceptionFromStateDict


def _random_inception() -> nn.Module:
    """The FID Inception-v3 architecture with random weights (for loading a state dict into, and for tests)."""
    placeholder = io.BytesIO()
    torch.save({}, placeholder)  # our own empty dict: the one full unpickling torch-fidelity does is of this
    placeholder.seek(0)
    return _inception_class()("inception-v3-compat", ["2048"], feature_extractor_weights_path=placeholder)


def _missing_inception(weights: str | Path | None) -> FileNotFoundError:
    where = "no weights path given" if weights is None else f"{weights} does not exist"
    return FileNotFoundError(
        f"inception: {where}; expected torch-fidelity's FID Inception-v3 weights (pt_inception-2015-12-05, "
        f"{INCEPTION_WEIGHTS_FILE}); on a machine with network: curl -L -o {INCEPTION_WEIGHTS_FILE} {INCEPTION_URL}, "
        f"then pass weights=PATH (nothing is downloaded here)"
    )


def _load_into(module: nn.Module, sd: dict[str, Tensor], spec: str, weights: Path,
               ignore_prefixes: Sequence[str] = ()) -> None:
    try:
        load_strict(module, sd, ignore_prefixes=tuple(ignore_prefixes) + ("model_ema.",))
    except CheckpointKeyError as exc:
        raise ValueError(f"{spec}: the weights in {weights} do not fit this network ({exc})") from None


def _last_linear(model: nn.Module, spec: str) -> str:
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{spec}: no nn.Linear classification head to cut off (this architecture is not supported)")
    return names[-1]


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _torchvision(arch: str, weights: Path, spec: str, image_size: int | None) -> FeatureExtractor:
    from torchvision import models

    if arch not in models.list_models(module=models):
        raise ValueError(f"{spec}: torchvision has no classification model {arch!r} (e.g. resnet18, resnet50)")
    model = models.get_model(arch, weights=None)
    head = _last_linear(model, spec)
    # The file may or may not hold the classifier: its keys are skipped on both sides, then the head is cut off.
    _load_into(model, load_state_dict(weights), spec, weights, ignore_prefixes=(head + ".",))
    _replace_module(model, head, nn.Identity())
    size = image_size or (299 if arch == "inception_v3" else 224)
    return FeatureExtractor(spec, model, (size, size), _IMAGENET_MEAN, _IMAGENET_STD)


def _timm(name: str, weights: Path, spec: str, image_size: int | None) -> FeatureExtractor:
    import timm
    from timm.data import resolve_data_config

    try:
        model = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise ValueError(f"{spec}: {str(exc).splitlines()[0]}") from None
    classifier = model.pretrained_cfg.get("classifier") or ()
    heads = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    _load_into(model, load_state_dict(weights), spec, weights, ignore_prefixes=tuple(f"{h}." for h in heads))
    config = resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    if image_size:
        height = width = image_size
    return FeatureExtractor(spec, model, (height, width), tuple(config["mean"]), tuple(config["std"]))


def _open_clip(name: str, weights: Path, spec: str, image_size: int | None) -> FeatureExtractor:
    import open_clip
    from open_clip.model import _build_vision_tower

    config = open_clip.get_model_config(name) if name in open_clip.list_models() else None
    if config is None:
        raise ValueError(f"{spec}: open_clip has no built-in model {name!r} (hub names would download; "
                         f"e.g. ViT-B-32, RN50)")
    # Only the image tower is built: no text tower (some would fetch a Hugging Face text model), no download.
    visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"], config.get("quick_gelu", False))
    sd = load_state_dict(weights)
    # A full CLIP checkpoint (visual.* and text keys) or the image tower's own state dict.
    _load_into(visual, filter_prefix(sd, "visual") or sd, spec, weights)
    size = image_size or visual.image_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    # OpenAI CLIP's normalisation, what open_clip uses when no pretrained tag says otherwise (SigLIP-style weights
    # want mean = std = 0.5: pass mean_std to load_feature_extractor).
    return FeatureExtractor(spec, visual, (height, width), tuple(open_clip.OPENAI_DATASET_MEAN),
                            tuple(open_clip.OPENAI_DATASET_STD))


_TOWERS: dict[str, Callable[[str, Path, str, int | None], FeatureExtractor]] = {
    "torchvision": _torchvision,
    "timm": _timm,
    "open_clip": _open_clip,
}


def load_feature_extractor(spec: str, weights: str | Path | None = None, *, device: str | torch.device = "cpu",
                           seed: int = 0, image_size: int | None = None,
                           mean_std: tuple[Sequence[float], Sequence[float]] | None = None) -> FeatureExtractor:
    """The feature extractor ``spec`` with weights from the local file ``weights`` (never downloaded).

    ``inception`` (FID's Inception-v3, 2048-d, needs torch-fidelity's weight file), ``torchvision:<arch>``,
    ``timm:<name>``, ``open_clip:<model>`` (domain towers, need their state dict), or ``tiny`` (seeded random
    network, tests only, no weights). ``image_size`` overrides a tower's square input size and ``mean_std`` its
    per-channel input normalisation (ImageNet's for torchvision, timm's config, OpenAI CLIP's for open_clip).
    """
    device = torch.device(device)
    if spec == "tiny":
        if weights is not None:
            raise ValueError("tiny: the test network is random (seeded) and takes no weights")
        return FeatureExtractor("tiny", _tiny_network(seed), (_TINY_SIZE, _TINY_SIZE), device=device)
    if spec == "inception":
        if weights is None or not Path(weights).is_file():
            raise _missing_inception(weights)
        model = _random_inception()
        _load_into(model, load_state_dict(weights), spec, Path(weights))
        return FeatureExtractor(spec, model, (INCEPTION_SIZE, INCEPTION_SIZE), uint8_input=True, device=device)
    family, _, name = spec.partition(":")
    if family not in _TOWERS or not name:
        raise ValueError(f"unknown feature extractor {spec!r} (expected inception, torchvision:<arch>, timm:<name>, "
                         f"open_clip:<model> or tiny)")
    if weights is None:
        raise ValueError(f"{spec}: needs weights=PATH, a local state-dict file (nothing is downloaded)")
    extractor = _TOWERS[family](name, Path(weights), spec, image_size).to(device)
    if mean_std is not None:
        mean, std = (tuple(float(v) for v in values) for values in mean_std)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"{spec}: mean_std must be two triples (std > 0), got {mean_std!r}")
        extractor.mean, extractor.std = mean, std
    logger.info("feature extractor %s from %s, input %s", spec, weights, extractor.input_size)
    return extractor


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


def _unit_rows(feats: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(feats, axis=1, keepdims=True)
    return feats / np.maximum(norms, 1e-12)


def _mean_pairwise_cosine(feats: np.ndarray) -> float:
    unit = _unit_rows(feats)
    sim = unit @ unit.T
    n = len(feats)
    return float((n * n - sim.sum()) / (n * (n - 1)))  # mean of 1 − cos over ordered pairs i ≠ j (diagonal = 1)


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    sq = (x * x).sum(axis=1)[:, None] + (y * y).sum(axis=1)[None, :] - 2.0 * x @ y.T
    return np.clip(sq, 0.0, None)


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

    @property
    def flagged(self) -> bool:
        return self.feature_flag or self.pixel_flag


_PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 100)


@dataclass
class MemorisationReport:
    """Nearest training image of every synthetic image, sorted closest first (by ``NearestMatch.score``)."""

    matches: list[NearestMatch]
    feature_threshold: float
    pixel_threshold: float
    synthetic_images: Sequence[ImageLike] = field(repr=False)
    training_images: Sequence[ImageLike] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-able: counts flagged per space, thresholds, percentiles of both distance distributions."""
        feature = np.array([m.feature_distance for m in self.matches])
        pixel = np.array([m.pixel_rmse for m in self.matches])
        return {
            "n_synthetic": len(self.matches),
            "n_training": len(self.training_images),
            "feature_threshold": self.feature_threshold,
            "pixel_threshold": self.pixel_threshold,
            "flagged_feature": int(sum(m.feature_flag for m in self.matches)),
            "flagged_pixel": int(sum(m.pixel_flag for m in self.matches)),
            "flagged_any": int(sum(m.flagged for m in self.matches)),
            "feature_distance_percentiles": {f"p{q}": float(np.percentile(feature, q)) for q in _PERCENTILES},
            "pixel_rmse_percentiles": {f"p{q}": float(np.percentile(pixel, q)) for q in _PERCENTILES},
            "closest": [{"synthetic": m.synthetic, "feature_nearest": m.feature_nearest,
                         "feature_distance": m.feature_distance, "pixel_nearest": m.pixel_nearest,
                         "pixel_rmse": m.pixel_rmse, "flagged": m.flagged} for m in self.matches[:10]],
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
        write_png_atomic(path, np.concatenate(rows, axis=0))
        return path


def memorisation(synthetic_images: Sequence[ImageLike], training_images: Sequence[ImageLike], *,
                 synthetic_features: Any, training_features: Any, synthetic_pixels: Any = None,
                 training_pixels: Any = None, pixel_size: int = DEFAULT_PIXEL_SIZE,
                 feature_threshold: float = DEFAULT_FEATURE_THRESHOLD,
                 pixel_threshold: float = DEFAULT_PIXEL_THRESHOLD, chunk: int = 256) -> MemorisationReport:
    """For each synthetic image its nearest training image by feature cosine distance and by pixel RMSE (images
    downscaled to ``pixel_size``², computed here unless the ``*_pixels`` from ``pixel_vectors`` are given), flagged as
    a near-copy when below ``feature_threshold`` or ``pixel_threshold``. Images (paths or arrays) are kept to draw
    ``MemorisationReport.write_nearest_pairs_png``."""
    if feature_threshold <= 0 or pixel_threshold <= 0:
        raise ValueError(f"thresholds must be positive, got {feature_threshold} and {pixel_threshold}")
    if not len(synthetic_images) or not len(training_images):
        raise ValueError(f"memorisation: needs synthetic and training images, got {len(synthetic_images)} and "
                         f"{len(training_images)}")
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
    s_unit, t_unit = _unit_rows(s_feat), _unit_rows(t_feat)
    matches = []
    for start in range(0, len(s_feat), chunk):
        stop = min(start + chunk, len(s_feat))
        cosine = 1.0 - s_unit[start:stop] @ t_unit.T
        rmse = np.sqrt(_squared_distances(s_pix[start:stop], t_pix) / s_pix.shape[1])
        for row in range(stop - start):
            fi, pi = int(np.argmin(cosine[row])), int(np.argmin(rmse[row]))
            fd, pd = max(float(cosine[row, fi]), 0.0), float(rmse[row, pi])
            i = start + row
            matches.append(NearestMatch(
                _label(synthetic_images[i], i), _label(training_images[fi], fi), fd, _label(training_images[pi], pi),
                pd, fd < feature_threshold, pd < pixel_threshold, min(fd / feature_threshold, pd / pixel_threshold),
                i, fi, pi))
    matches.sort(key=lambda m: (m.score, m.synthetic_index))
    report = MemorisationReport(matches, feature_threshold, pixel_threshold, synthetic_images, training_images)
    flagged = sum(m.flagged for m in matches)
    if flagged:
        logger.warning("memorisation: %d of %d synthetic images are near-copies of training images (feature cosine "
                       "< %g or pixel RMSE < %g)", flagged, len(matches), feature_threshold, pixel_threshold)
    return report


# --------------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------------


class RunImage(NamedTuple):
    name: str
    source: str  # the conditioning mask (manifest ``source``): groups the samples of one mask
    path: Path


def read_run_images(out_dir: str | Path) -> list[RunImage]:
    """Images of a sampling run (``OUT/manifest.jsonl``), in a deterministic order: by sample index k, then mask,
    then name, so that the first N cover as many different masks as possible."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir} (not a tutorial_inference.py output folder?)")
    records = read_manifest(manifest)
    if not records:
        raise ValueError(f"{manifest}: no records")
    rows = []
    for record in records.values():
        if "image" not in record:
            raise ValueError(f"{manifest}: record {record['name']} has no 'image' key")
        path = out_dir / str(record["image"])
        if not path.is_file():
            raise FileNotFoundError(f"{manifest}: image of {record['name']} is missing: {path}")
        source = str(record.get("source", record.get("source_name", record["name"])))
        k = record.get("k", 0)
        rows.append((int(k) if isinstance(k, (int, float)) else 0, source, str(record["name"]), path))
    rows.sort(key=lambda row: row[:3])
    return [RunImage(name, source, path) for _, source, name, path in rows]


def read_dataset_images(path: str | Path) -> list[Path]:
    """Images of a real dataset: the ``target`` images of a prompt.json (the file, or a folder holding one), in file
    order; else every image file under the folder (recursive, sorted)."""
    path = Path(path)
    if path.is_dir() and (path / PROMPT_FILE).is_file():
        path = path / PROMPT_FILE
    if path.is_file():
        return [record.target for record in read_prompt_jsonl(path) if record.target is not None]
    if not path.is_dir():
        raise FileNotFoundError(f"dataset not found: {path} (expected a prompt.json or a folder of images)")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{path}: no image files ({', '.join(_IMAGE_SUFFIXES)}) and no {PROMPT_FILE}")
    return images


def equal_count(real: Sequence[Any], synthetic: Sequence[Any], count: int | None = None
                ) -> tuple[list[Any], list[Any]]:
    """The first ``count`` (default: all real images) of each list, for FID between the training images and an EQUAL
    number of synthetic images. Raises one line when either list is shorter than the count."""
    n = len(real) if count is None else count
    if n < 2:
        raise ValueError(f"equal_count: need a count of at least 2, got {n}")
    if len(real) < n:
        raise ValueError(f"only {len(real)} real images for a count of {n}")
    if len(synthetic) < n:
        raise ValueError(f"only {len(synthetic)} synthetic images for {n} real ones (sample more, or pass a count ≤ "
                         f"{len(synthetic)})")
    return list(real[:n]), list(synthetic[:n])
