"""Images and their features for the image-quality measures (``siamese.evaluation.quality``): image loading, pixel
vectors, feature extractors from local weight files, and the readers of sampling runs and datasets.

* ``inception``: the FID Inception-v3 of torch-fidelity (TensorFlow's 2015-12-05 graph converted to PyTorch;
  torchmetrics' ``FrechetInceptionDistance`` wraps the same network), 2048-d pool features, from a local weight file.
* Domain towers: ``torchvision:<arch>`` (penultimate layer: the last ``nn.Linear`` replaced by the identity),
  ``timm:<name>`` (``num_classes=0``) and ``open_clip:<model>`` (the image tower alone, built from the model's config;
  OpenAI CLIP's normalisation unless ``mean_std`` says otherwise); each from a local weight file read with
  ``ldm.checkpoint.load_state_dict`` (safetensors or ``weights_only`` pickles).
* ``first_stage``: the VAE encoder of a checkpoint of this framework (a ``tools.pretrain`` base or a merged model),
  channel means, standard deviations and 2×2-pooled means of its last feature map: a domain tower when no
  pretrained one is at hand (weaker than DINOv2, but trained on the user's own images).
* ``tiny``: a seeded random network for tests only; its features mean nothing.

Nothing here ever downloads weights. Images enter as uint8 RGB H×W×3 arrays or image paths; every extractor resizes to
its input size with PIL's antialiased bicubic filter (the resize Clean-FID, Parmar et al. 2022, recommends), squashing
the aspect ratio as the training data pipeline does, so an image's features never depend on the batch it is in.
"""

from __future__ import annotations

import io
import logging
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
from siamese.pairs_io import MANIFEST_NAME, read_manifest

__all__ = [
    "DEFAULT_PIXEL_SIZE",
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_FILE",
    "FeatureExtractor",
    "RunImage",
    "equal_count",
    "load_feature_extractor",
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


class _FirstStageFeatures(nn.Module):
    """The VAE encoder trunk of a framework checkpoint (down levels and middle block, before the latent projection)
    → per channel its spatial mean and standard deviation (texture statistics) and its 2×2-pooled means (layout)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder.trunk(x)
        layout = nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        return torch.cat([h.mean((2, 3)), h.std((2, 3)), layout], dim=1)


def _first_stage(weights: Path, spec: str, image_size: int | None) -> FeatureExtractor:
    """``first_stage``: the domain's own VAE encoder from a checkpoint of this framework (a ``tools.pretrain`` base
    or a merged model: its config is in the metadata), when no pretrained image tower is at hand."""
    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import read_metadata

    from siamese.config import config_from_metadata
    from siamese.factory import build_first_stage

    if not Path(weights).is_file():
        raise FileNotFoundError(f"{spec}: weights file not found: {weights}")
    cfg = config_from_metadata(read_metadata(weights), str(weights))
    if cfg is None:
        raise ValueError(f"{spec}: {weights} carries no config in its metadata (a tools.pretrain base or a merged "
                         "checkpoint of this framework is needed)")
    vae = build_first_stage(cfg.model.first_stage)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"{spec}: {weights} has no VAE (model.first_stage.kind is {cfg.model.first_stage.kind})")
    _load_into(vae, filter_prefix(load_state_dict(weights), "first_stage_model"), spec, weights)
    size = image_size or cfg.data.resolution
    # The VAE sees images in [-1, 1]: (x / 255 − 0.5) / 0.5.
    return FeatureExtractor(spec, _FirstStageFeatures(vae.encoder), (size, size))


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
    ``timm:<name>``, ``open_clip:<model>`` (domain towers, need their state dict), ``first_stage`` (the VAE encoder
    of a base or merged checkpoint of this framework: weights = that checkpoint), or ``tiny`` (seeded random
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
    if spec == "first_stage":
        if weights is None:
            raise ValueError("first_stage: needs weights=PATH, a base or merged checkpoint of this framework")
        return _first_stage(Path(weights), spec, image_size).to(device)
    family, _, name = spec.partition(":")
    if family not in _TOWERS or not name:
        raise ValueError(f"unknown feature extractor {spec!r} (expected inception, torchvision:<arch>, timm:<name>, "
                         f"open_clip:<model>, first_stage or tiny)")
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
