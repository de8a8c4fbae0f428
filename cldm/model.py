"""The full ControlNet latent-diffusion model under the original state-dict layout (``ControlLDM``).

Owns every network under the names the original code and the released Siamese-Diffusion weights use:
``model.diffusion_model.*`` (UNet), ``control_model.*`` (ControlNet + hint encoder), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (CLIP text, transformers layout) and the 13 schedule buffers, so
``state_dict()`` / ``load_state_dict(strict=True)`` are interchangeable with original checkpoints. The text encoder
runs on open_clip's tower; two state-dict hooks translate its keys to and from the SD1.5 layout.

Training losses live elsewhere (``siamese``); this module offers the pieces they and the sampler need.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.sampler import Generators, cfg_denoiser, ddim_sample
from ldm.schedule import BUFFER_NAMES, Schedule
from ldm.text_encoder import FrozenCLIPTextEncoder, open_clip_to_sd15, sd15_to_open_clip
from ldm.unet import UNetModel

import torch
from torch import Tensor, nn

from cldm.controlnet import ControlNet
from cldm.hint import HINT_DOWNSAMPLE

SD15_TEXT_PREFIX = "transformer.text_model."


class DiffusionWrapper(nn.Module):
    """Holds the UNet as ``diffusion_model`` (the original ``model.diffusion_model.*`` key prefix)."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


def _text_to_sd15_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    ours = {k[len(prefix):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for key, value in open_clip_to_sd15(ours, position_ids=True).items():
        state_dict[prefix + SD15_TEXT_PREFIX + key] = value


def _text_from_sd15_layout(state_dict: dict, prefix: str, *args) -> None:
    full = prefix + SD15_TEXT_PREFIX
    sd15 = {k[len(full):]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(full)]}
    if sd15:
        for key, value in sd15_to_open_clip(sd15).items():
            state_dict[prefix + key] = value


class ControlLDM(nn.Module):
    """UNet + ControlNet + frozen first stage + frozen text encoder + diffusion schedule."""

    def __init__(self, unet: UNetModel, control: ControlNet, first_stage: AutoencoderKL | IdentityFirstStage,
                 text_encoder: FrozenCLIPTextEncoder, schedule: Schedule):
        super().__init__()
        if text_encoder.config.width != unet.config.context_dim:
            raise ValueError(f"text encoder width {text_encoder.config.width} != unet.context_dim "
                             f"{unet.config.context_dim}")
        self.model = DiffusionWrapper(unet)
        self.control_model = control
        self.first_stage_model = first_stage.requires_grad_(False).eval()
        self.cond_stage_model = text_encoder
        text_encoder.register_state_dict_post_hook(_text_to_sd15_layout)
        text_encoder._register_load_state_dict_pre_hook(_text_from_sd15_layout)
        for name, value in schedule.buffers().items():
            self.register_buffer(name, value)

    # -- parts ------------------------------------------------------------------------------------------------------
    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def control(self) -> ControlNet:
        return self.control_model

    @property
    def schedule(self) -> Schedule:
        """The schedule as a view of this module's buffers (on the module's device)."""
        return Schedule(**{name: getattr(self, name) for name in BUFFER_NAMES})

    def train(self, mode: bool = True) -> ControlLDM:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: stays in eval mode (the text encoder pins itself)
        return self

    def configure_trainable(self, sd_locked: bool) -> list[str]:
        """Set ``requires_grad`` for the trainable set and return its parameter names.

        ``sd_locked=True``: ControlNet only. ``sd_locked=False`` (the Siamese recipe): ControlNet + UNet decoder
        (``output_blocks``, ``out``). The UNet time embedding, input blocks and middle block are never trained.
        """
        self.requires_grad_(False)
        self.control_model.requires_grad_(True)
        if not sd_locked:
            for p in self.unet.decoder_parameters().values():
                p.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- conditioning -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] → scaled latents ``z0`` (a posterior sample, as in training)."""
        return self.first_stage_model.encode_to_latent(images, generator)

    @torch.no_grad()
    def decode_latents(self, z: Tensor) -> Tensor:
        """Scaled latents → images in [-1, 1] (clamped)."""
        return self.first_stage_model.decode_from_latent(z).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts → text context (B × 77 × width)."""
        return self.cond_stage_model.encode(list(prompts))

    # -- prediction -------------------------------------------------------------------------------------------------
    def eps(self, z_t: Tensor, t: Tensor, context: Tensor, hint: Tensor) -> Tensor:
        """ε prediction of the controlled UNet for a hint (the Mask-Diffusion branch when ``hint`` is a mask)."""
        control = self.control_model(z_t, hint, t, context)
        return self.unet(z_t, t, context, control, self.control_model.control_config.only_mid_control)

    def denoise(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The sampler's denoise protocol: ``cond = {"context": …, "hint": …}``."""
        return self.eps(z_t, t, cond["context"], cond["hint"])

    @torch.no_grad()
    def sample(self, hint: Tensor, prompts: Sequence[str], *, steps: int = 50, cfg_scale: float = 9.0,
               eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
               batched_cfg: bool = True, progress: bool = False, context: Tensor | None = None,
               uncond_context: Tensor | None = None) -> Tensor:
        """Mask-conditioned DDIM sampling → images in [-1, 1].

        Classifier-free guidance on the text only: the unconditional input is the empty prompt with the *same*
        hint, ``ε = ε(z, "", h) + s · (ε(z, τ, h) − ε(z, "", h))`` (the released protocol). ``generator`` may be
        one per sample (see ``ddim_sample``); ``context`` / ``uncond_context`` are text contexts already encoded
        (of ``prompts`` / of ""), e.g. cached by a caller that samples many batches with few prompts.
        """
        hint = hint.to(self.betas.device, self.unet.dtype)  # the networks' dtype (bf16 when DeepSpeed cast them)
        b, _, h, w = hint.shape
        cond = {"context": self.encode_prompts(prompts) if context is None else context, "hint": hint}
        uncond = None
        if cfg_scale != 1.0:
            uncond = {"context": self.encode_prompts([""] * b) if uncond_context is None else uncond_context,
                      "hint": hint}
        denoise = cfg_denoiser(self.denoise, uncond, cfg_scale, batched=batched_cfg)
        shape = (b, self.unet.config.in_channels, h // HINT_DOWNSAMPLE, w // HINT_DOWNSAMPLE)
        z = ddim_sample(denoise, shape, cond, self.schedule, steps=steps, eta=eta, generator=generator, x_T=x_T,
                        device=hint.device, dtype=hint.dtype, progress=progress)
        return self.decode_latents(z)

