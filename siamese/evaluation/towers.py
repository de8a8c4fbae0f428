"""Feature towers from local weight files, for FID/KID, memorisation and the quality filter.

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

Nothing here ever downloads weights.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ldm.checkpoint import CheckpointKeyError, filter_prefix, load_state_dict, load_strict

import torch
from torch import Tensor, nn

from siamese.evaluation.features import FeatureExtractor
from siamese.evaluation.settings import INCEPTION_WEIGHTS_FILE

__all__ = ["INCEPTION_URL", "INCEPTION_WEIGHTS_FILE", "load_feature_extractor"]

logger = logging.getLogger(__name__)

INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILE}"
INCEPTION_SIZE = 299

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_TINY_SIZE = 32


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
