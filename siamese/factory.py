"""The composition root: the one place where a validated ``ExperimentConfig`` becomes objects.

Constructors elsewhere take typed arguments or built modules; only this module reads configuration sections.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ldm.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.checkpoint import load_state_dict, load_strict
from ldm.model import LatentDiffusion
from ldm.schedule import Schedule
from ldm.text_encoder import FrozenCLIPTextEncoder
from ldm.unet import UNetModel

import torch
from torch.utils.data import Dataset

from cldm.controlnet import ControlNet
from cldm.lora import add_lora
from cldm.model import ControlLDM
from siamese.config import ExperimentConfig, FirstStageConfig, ModelConfig
from siamese.data.datasets import ImageDataset, MaskImageDataset, SyntheticLesionDataset
from siamese.model import SiameseDiffusion

logger = logging.getLogger(__name__)


def build_first_stage(cfg: FirstStageConfig) -> AutoencoderKL | IdentityFirstStage:
    if cfg.kind == "identity":
        return IdentityFirstStage(cfg.ddconfig.in_channels)
    dd = cfg.ddconfig
    return AutoencoderKL(embed_dim=cfg.embed_dim, z_channels=dd.z_channels, resolution=dd.resolution,
                         in_channels=dd.in_channels, out_ch=dd.out_ch, ch=dd.ch, ch_mult=dd.ch_mult,
                         num_res_blocks=dd.num_res_blocks, attn_resolutions=dd.attn_resolutions, dropout=dd.dropout,
                         double_z=dd.double_z, scale_factor=cfg.scale_factor)


def build_schedule(cfg: ModelConfig) -> Schedule:
    sch = cfg.schedule
    return Schedule.from_config(sch.beta_schedule, sch.timesteps, sch.linear_start, sch.linear_end)


def build_latent_diffusion(cfg: ModelConfig) -> LatentDiffusion:
    """SD itself (UNet, first stage, text encoder, schedule) without a ControlNet: what base pretraining trains and
    exports, under the SD1.5 key layout that ``tool_add_control.py`` takes."""
    return LatentDiffusion(UNetModel(cfg.unet), build_first_stage(cfg.first_stage),
                           FrozenCLIPTextEncoder(cfg.text_encoder), build_schedule(cfg))


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> ControlLDM:
    """The full model with freshly initialised weights (load a checkpoint with ``load_weights``).

    ``device``: initialise the weights directly there (no host copy of a second model). The schedule buffers are
    always computed on the CPU in float64, so they are moved afterwards.
    """
    if device is not None:
        with torch.device(device):
            return build_model(cfg).to(device)
    return ControlLDM(unet=UNetModel(cfg.unet), control=ControlNet(cfg.unet, cfg.control),
                      first_stage=build_first_stage(cfg.first_stage),
                      text_encoder=FrozenCLIPTextEncoder(cfg.text_encoder), schedule=build_schedule(cfg))


def load_weights(model: ControlLDM, path: str | Path, *, unsafe_pickle: bool = False,
                 map_location: str | torch.device = "cpu") -> None:
    """Load a full checkpoint (original key names) strictly; ``model_ema.*``/``position_ids`` are ignored.

    ``map_location``: where the file's tensors are read to; the model's device avoids a second full copy in host
    memory (several sampling processes per node each hold one otherwise)."""
    state = load_state_dict(path, unsafe_pickle=unsafe_pickle, map_location=map_location)
    report = load_strict(model, state)
    logger.info("loaded %s (%d tensors)%s", path, len(state), "" if report.ok else f": {report.summary()}")


def build_method(cfg: ExperimentConfig, model: ControlLDM) -> SiameseDiffusion:
    return SiameseDiffusion(model.unet, model.control, model.schedule, cfg.method.weights,
                            cfg.method.recipe(cfg.train.total_steps))


def build_dataset(cfg: ExperimentConfig) -> Dataset:
    """The training pairs: ``data.root`` in the original layout, or the built-in generated lesions."""
    if cfg.data.root is None:
        kwargs = {"prompt": cfg.data.prompt} if cfg.data.prompt else {}
        return SyntheticLesionDataset(cfg.data.synthetic_samples, cfg.data.resolution, seed=cfg.train.seed,
                                      hint_resolution=cfg.hint_size, **kwargs)
    return MaskImageDataset(cfg.data.root, cfg.data.resolution, hint_resolution=cfg.hint_size,
                            prompt_override=cfg.data.prompt, threshold=cfg.data.mask_threshold,
                            intensity=cfg.data.intensity)


def build_image_dataset(cfg: ExperimentConfig) -> Dataset:
    """Images (and prompts) for base pretraining: ``data.root`` as a prompt.json layout or a plain folder of images,
    or the built-in generated images when it is null."""
    if cfg.data.root is None:
        return build_dataset(cfg)  # the generated pairs; pretraining reads only their images and prompts
    return ImageDataset.from_root(cfg.data.root, cfg.data.resolution, cfg.sample.prompt, cfg.data.prompt,
                                  intensity=cfg.data.intensity)


def meta_model(cfg: ModelConfig) -> ControlLDM:
    """The model on the meta device: keys and shapes at any geometry without allocating weights."""
    with torch.device("meta"):
        return build_model(cfg)


def add_adapters(cfg: ExperimentConfig, model: ControlLDM) -> ControlLDM:
    """The training-time adapters of the experiment (``method.lora``) added to ``model`` in place."""
    if cfg.method.lora.enabled:
        add_lora(model.unet, model.control, cfg.method.lora)
    return model


def meta_training_model(cfg: ExperimentConfig) -> ControlLDM:
    """``meta_model`` with the experiment's training adapters: the keys a training checkpoint holds."""
    with torch.device("meta"):
        return add_adapters(cfg, build_model(cfg.model))
