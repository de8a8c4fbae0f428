"""Stable Diffusion 1.5 as one module under the original state-dict layout (``LatentDiffusion``).

The latent-diffusion checkpoint layout (Rombach et al. 2022) that SD1.5 files and every ControlNet derivative use:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*``
(CLIP text, transformers layout) and the 13 schedule buffers, so ``state_dict()`` / ``load_state_dict(strict=True)``
are interchangeable with SD1.5 checkpoints. The text encoder runs on open_clip's tower; two state-dict hooks
translate its keys to and from the SD1.5 layout. ``cldm.model.ControlLDM`` extends this with ``control_model.*``.

Base pretraining (``tools/pretrain.py``) trains the UNet of this module as SD1.5 was trained: ε-prediction with the
text context, classifier-free guidance by dropping the prompt. Sampling is text-conditioned: DDIM or one of the
faster ODE solvers of ``ldm.solvers`` (``sampler``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm import solvers
from ldm.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.regions import DEFAULT_REGION, RegionSpec, latent_region
from ldm.sampler import (
    Generators,
    background_denoiser,
    background_start,
    cfg_denoiser,
    dual_cfg_denoiser,
    initial_latent,
)
from ldm.schedule import BUFFER_NAMES, Schedule
from ldm.text_encoder import FrozenCLIPTextEncoder, open_clip_to_sd15, sd15_to_open_clip
from ldm.unet import UNetModel

import torch
from torch import Tensor, nn

SD15_TEXT_PREFIX = "transformer.text_model."  # under cond_stage_model.


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


class LatentDiffusion(nn.Module):
    """UNet + frozen first stage + frozen text encoder + diffusion schedule (an SD1.5 checkpoint)."""

    def __init__(self, unet: UNetModel, first_stage: AutoencoderKL | IdentityFirstStage,
                 text_encoder: FrozenCLIPTextEncoder, schedule: Schedule):
        super().__init__()
        if text_encoder.config.width != unet.config.context_dim:
            raise ValueError(f"text encoder width {text_encoder.config.width} != unet.context_dim "
                             f"{unet.config.context_dim}")
        self.model = DiffusionWrapper(unet)
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
    def schedule(self) -> Schedule:
        """The schedule as a view of this module's buffers (on the module's device)."""
        return Schedule(**{name: getattr(self, name) for name in BUFFER_NAMES})

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel (8 for SD1.5's VAE)."""
        return self.first_stage_model.downsample_factor

    def train(self, mode: bool = True) -> LatentDiffusion:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: stays in eval mode (the text encoder pins itself)
        return self

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
    def eps(self, z_t: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """ε prediction of the whole UNet, encoder included in autograd (what base pretraining trains)."""
        return self.unet(z_t, t, context, encoder_grad=True)

    def denoise(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The sampler's denoise protocol: ``cond = {"context": …}``."""
        return self.unet(z_t, t, cond["context"])

    @torch.no_grad()
    def sample_latents(self, cond: dict[str, Tensor], uncond: dict[str, Tensor] | None, shape: Sequence[int], *,
                       steps: int, cfg_scale: float, eta: float, generator: Generators, x_T: Tensor | None,
                       batched_cfg: bool, progress: bool, sampler: str = "ddim",
                       uncond_all: dict[str, Tensor] | None = None, scale_all: float | None = None,
                       background: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """``sampler`` (``ldm.solvers.SAMPLERS``) over ``denoise`` with classifier-free guidance (``uncond`` = the
        unconditional ``cond``). With ``scale_all`` set, two-condition guidance (``dual_cfg_denoiser``) instead:
        ``uncond_all`` is the fully unconditional input, ``scale_all`` the scale from it to ``uncond``.
        ``background = (z_bg, region)``: generate inside ``region`` only and keep the latent ``z_bg`` outside it
        (``background_denoiser``; the returned latent is ``z_bg`` exactly outside the region). The start is then
        ``background_start``: ``x_T`` (or the noise drawn from ``generator``) inside the region, and outside it
        ``z_bg`` noised with that same noise to the sampler's first timestep (``solvers.first_timestep``), so the
        outside follows ``√ᾱ_t z_bg + √(1 − ᾱ_t) n`` (MedDiff-FT eq. 2, one noise draw) from the first step on."""
        if scale_all is None:
            denoise = cfg_denoiser(self.denoise, uncond, cfg_scale, batched=batched_cfg)
        else:
            denoise = dual_cfg_denoiser(self.denoise, uncond, uncond_all, cfg_scale, scale_all, batched=batched_cfg)
        if background is not None:
            denoise = background_denoiser(denoise, background[0], background[1], self.alphas_cumprod)
            noise = initial_latent(shape, generator, x_T, self.betas.device, self.unet.dtype, sampler)
            t0 = solvers.first_timestep(sampler, self.schedule, steps)
            x_T = background_start(noise, background[0], background[1], self.alphas_cumprod, t0)
        z = solvers.sample(sampler, denoise, shape, cond, self.schedule, steps=steps, eta=eta, generator=generator,
                           x_T=x_T, device=self.betas.device, dtype=self.unet.dtype, progress=progress)
        if background is not None:  # the last step ends at t = 0, not at the clean latent: keep z_bg exactly
            z = torch.where(background[1].bool(), z, background[0].to(z.dtype))
        return z

    @torch.no_grad()
    def background_condition(self, background: Tensor, mask: Tensor, latent_size: Sequence[int],
                             region: str | RegionSpec = DEFAULT_REGION) -> tuple[Tensor, Tensor]:
        """``(z_bg, region)`` for ``sample_latents(background=…)`` from background images in [-1, 1] and a mask in
        [0, 1] of the same size (B × 1 × H × W): the background encoded with the posterior mean; the latent cells to
        generate are chosen by ``region`` (``ldm.regions``: ``max-pool``, any of a cell's pixels in the mask, is the
        default; ``area:F``, ``dilate:N``)."""
        if background.shape[0] != mask.shape[0] or tuple(background.shape[-2:]) != tuple(mask.shape[-2:]):
            raise ValueError(f"background is {tuple(background.shape)}, its mask {tuple(mask.shape)}: the batch and "
                             "the image size must match")
        z_bg = self.first_stage_model.encode_to_latent(background, mode=True)
        return z_bg, latent_region(mask, latent_size, region)

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], size: int | tuple[int, int], *, steps: int = 50, cfg_scale: float = 9.0,
               eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None, batched_cfg: bool = True,
               progress: bool = False, sampler: str = "ddim", background: Tensor | None = None,
               mask: Tensor | None = None, region: str | RegionSpec = DEFAULT_REGION) -> Tensor:
        """Text-conditioned sampling (``sampler``: ddim, dpmpp_2m or unipc) of images of ``size`` pixels → images in
        [-1, 1].

        Guidance: ``ε = ε(z, "") + s · (ε(z, τ) − ε(z, ""))`` (Ho & Salimans 2022), as SD1.5 samples. With
        ``background`` and ``mask`` (B × 1 × H × W in [0, 1]): generate inside the mask only and keep the background
        outside it (MedDiff-FT eq. 2 with a fine-tuned base, ``ldm.sampler.background_denoiser``); ``region``
        chooses the latent cells generated (``ldm.regions``).
        """
        height, width = (size, size) if isinstance(size, int) else size
        f = self.latent_factor
        if height % f or width % f:
            raise ValueError(f"image size {height}×{width} must be a multiple of the first stage's factor {f}")
        dtype = self.unet.dtype
        cond = {"context": self.encode_prompts(prompts).to(dtype)}
        uncond = {"context": self.encode_prompts([""] * len(prompts)).to(dtype)} if cfg_scale != 1.0 else None
        shape = (len(prompts), self.unet.config.in_channels, height // f, width // f)
        keep = None
        if (background is None) != (mask is None):
            raise ValueError("background-preserving sampling needs both a background and a mask")
        if background is not None:
            if tuple(background.shape[-2:]) != (height, width):
                raise ValueError(f"background is {tuple(background.shape[-2:])}, the sample size {(height, width)}")
            device = self.betas.device
            keep = self.background_condition(background.to(device, dtype), mask.to(device), shape[-2:], region)
        z = self.sample_latents(cond, uncond, shape, steps=steps, cfg_scale=cfg_scale, eta=eta, generator=generator,
                                x_T=x_T, batched_cfg=batched_cfg, progress=progress, sampler=sampler, background=keep)
        return self.decode_latents(z)
