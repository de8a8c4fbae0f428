"""The full ControlNet latent-diffusion model under the original state-dict layout (``ControlLDM``).

Owns every network under the names the original code and the released Siamese-Diffusion weights use:
``model.diffusion_model.*`` (UNet), ``control_model.*`` (ControlNet + hint encoder), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (CLIP text, transformers layout) and the 13 schedule buffers, so
``state_dict()`` / ``load_state_dict(strict=True)`` are interchangeable with original checkpoints. Everything but
the ControlNet is ``ldm.model.LatentDiffusion`` (SD1.5 itself).

Training losses live elsewhere (``siamese``); this module offers the pieces they and the sampler need.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.model import SD15_TEXT_PREFIX, LatentDiffusion
from ldm.regions import DEFAULT_REGION, RegionSpec
from ldm.sampler import Generators
from ldm.schedule import Schedule
from ldm.text_encoder import FrozenCLIPTextEncoder
from ldm.unet import UNetModel

import torch
from torch import Tensor

from cldm.controlnet import ControlNet
from cldm.hint import HINT_DOWNSAMPLE
from cldm.lora import LoraSettings
from cldm.lora import configure_trainable as configure_lora_trainable

__all__ = ["SD15_TEXT_PREFIX", "ControlLDM"]


class ControlLDM(LatentDiffusion):
    """UNet + ControlNet + frozen first stage + frozen text encoder + diffusion schedule."""

    def __init__(self, unet: UNetModel, control: ControlNet, first_stage: AutoencoderKL | IdentityFirstStage,
                 text_encoder: FrozenCLIPTextEncoder, schedule: Schedule):
        super().__init__(unet, first_stage, text_encoder, schedule)
        self.control_model = control

    # -- parts ------------------------------------------------------------------------------------------------------
    @property
    def control(self) -> ControlNet:
        return self.control_model

    def configure_trainable(self, sd_locked: bool, lora: LoraSettings | None = None) -> list[str]:
        """Set ``requires_grad`` for the trainable set and return its parameter names.

        ``sd_locked=True``: ControlNet only. ``sd_locked=False`` (the Siamese recipe): ControlNet + UNet decoder
        (``output_blocks``, ``out``). The UNet time embedding, input blocks and middle block are never trained.
        With ``lora`` enabled (adapters added by ``cldm.lora.add_lora``), the decoder trains through its adapters
        only (``cldm.lora.configure_trainable``).
        """
        self.requires_grad_(False)
        if lora is not None and lora.enabled:
            configure_lora_trainable(self.unet, self.control_model, lora)
            return [n for n, p in self.named_parameters() if p.requires_grad]
        self.control_model.requires_grad_(True)
        if not sd_locked:
            for p in self.unet.decoder_parameters().values():
                p.requires_grad_(True)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- prediction -------------------------------------------------------------------------------------------------
    def eps(self, z_t: Tensor, t: Tensor, context: Tensor, hint: Tensor | None,
            hint_feature: Tensor | None = None) -> Tensor:
        """ε prediction of the controlled UNet for a hint (the Mask-Diffusion branch when ``hint`` is a mask);
        ``hint_feature``: the hint already encoded (``ControlNet.encode_hint``), ``hint`` then unused."""
        control = self.control_model(z_t, hint, t, context, hint_feature=hint_feature)
        return self.unet(z_t, t, context, control, self.control_model.control_config.only_mid_control)

    def denoise(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        """The sampler's denoise protocol: ``cond = {"context": …, "hint": …}``, or ``{"context": …,
        "hint_feature": …}`` with the hint encoded once beforehand (``hint_condition``)."""
        if "hint_feature" in cond:
            return self.eps(z_t, t, cond["context"], None, cond["hint_feature"])
        return self.eps(z_t, t, cond["context"], cond["hint"])

    @torch.no_grad()
    def hint_condition(self, hint: Tensor, encode_once: bool = True) -> dict[str, Tensor]:
        """The hint part of a sampling condition: ``{"hint_feature": encode_hint(hint)}``, encoded here once for
        the whole sampling call (the hint encoder depends on neither t nor the prompt, so every step and guidance
        row reuses it), or ``{"hint": hint}`` with ``encode_once=False`` (encoded again at every call, the
        released behaviour; ``bench/vs_original_sampling.py`` compares both)."""
        if not encode_once:
            return {"hint": hint}
        return {"hint_feature": self.control_model.encode_hint(hint)}

    @torch.no_grad()
    def sample(self, hint: Tensor, prompts: Sequence[str], *, steps: int = 50, cfg_scale: float = 9.0,
               eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
               batched_cfg: bool = True, progress: bool = False, context: Tensor | None = None,
               uncond_context: Tensor | None = None, sampler: str = "ddim", cfg_mask: float | None = None,
               background: Tensor | None = None, region: str | RegionSpec = DEFAULT_REGION,
               encode_hint_once: bool = True, decode: bool = True) -> Tensor:
        """Mask-conditioned sampling (``sampler``: ddim, dpmpp_2m or unipc) → images in [-1, 1]
        (``LatentDiffusion.sample`` with a hint first).

        Classifier-free guidance on the text only: the unconditional input is the empty prompt with the *same*
        hint, ``ε = ε(z, "", h) + s · (ε(z, τ, h) − ε(z, "", h))`` (the released protocol). ``cfg_mask = s_m``
        guides the mask separately (InstructPix2Pix, Brooks et al. 2023, eq. 3), with an all-zero hint in the fully
        unconditional branch: ``ε = ε(z, "", 0) + s_m · (ε(z, "", h) − ε(z, "", 0)) + s · (ε(z, τ, h) − ε(z, "", h))``
        (three branches per step). ``generator`` may be one per sample (see ``ddim_sample``); ``context`` /
        ``uncond_context`` are text contexts already encoded (of ``prompts`` / of ""), e.g. cached by a caller that
        samples many batches with few prompts. ``background`` (images in [-1, 1], the hint's size): generate only
        inside the mask and keep the background outside it (MedDiff-FT eq. 2, ``ldm.sampler.background_denoiser``);
        the background is encoded with the posterior mean, and ``region`` chooses the latent cells generated
        (``ldm.regions``; default ``max-pool``: a cell any of whose image pixels lies in the mask).
        The hint encoder runs once per call (``hint_condition``; ``encode_hint_once=False``: at every step, as the
        released code; the same result up to float rounding). ``decode=False`` returns the final latents.
        """
        hint = hint.to(self.betas.device, self.unet.dtype)  # the networks' dtype (bf16 when DeepSpeed cast them)
        b, _, h, w = hint.shape
        if h % HINT_DOWNSAMPLE or w % HINT_DOWNSAMPLE:
            raise ValueError(f"hint is {(h, w)}: its size must be a multiple of {HINT_DOWNSAMPLE} (the latent's)")
        hinted = self.hint_condition(hint, encode_hint_once)
        cond = {"context": self.encode_prompts(prompts) if context is None else context, **hinted}
        uncond = uncond_all = None
        if cfg_scale != 1.0 or cfg_mask is not None:
            uncond = {"context": self.encode_prompts([""] * b) if uncond_context is None else uncond_context,
                      **hinted}
        if cfg_mask is not None:
            uncond_all = {"context": uncond["context"], **self.hint_condition(torch.zeros_like(hint),
                                                                               encode_hint_once)}
        shape = (b, self.unet.config.in_channels, h // HINT_DOWNSAMPLE, w // HINT_DOWNSAMPLE)
        keep = None
        if background is not None:
            if tuple(background.shape) != (b, 3, h, w):
                raise ValueError(f"background is {tuple(background.shape)}, expected {(b, 3, h, w)} (the hint's size)")
            keep = self.background_condition(background.to(hint.device, hint.dtype), hint[:, :1], shape[-2:],
                                             region)
        z = self.sample_latents(cond, uncond, shape, steps=steps, cfg_scale=cfg_scale, eta=eta, generator=generator,
                                x_T=x_T, batched_cfg=batched_cfg, progress=progress, sampler=sampler,
                                uncond_all=uncond_all, scale_all=cfg_mask, background=keep)
        return self.decode_latents(z) if decode else z

