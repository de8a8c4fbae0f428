"""Base-model pretraining: the two Lightning modules a ControlNet-style method starts from.

Stable Diffusion 1.5 was trained in two stages (Rombach et al. 2022), and so is a base model here:

1. ``AutoencoderModule`` trains the first stage (AutoencoderKL) on images: the L1 reconstruction summed over pixels,
   plus ``kl_weight`` × KL(q(z|x) ‖ N(0, I)) and optionally ``perceptual_weight`` × an LPIPS-style distance per
   pixel (``ldm.perceptual``), i.e. the generator side of ldm's ``LPIPSWithDiscriminator`` without the adversarial
   term and with its learned log-variance fixed at 0.
2. ``LatentDiffusionModule`` trains the whole text-conditioned UNet of ``ldm.model.LatentDiffusion`` with the
   ε-prediction loss ``‖ε_θ(z_t, t, τ) − ε‖²`` on the frozen first stage and text encoder, dropping the prompt with
   probability ``prompt_dropout`` (classifier-free guidance), the schedule and classes of SD1.5.

Both extend ``cldm.lightning.TrainModule``: the same trainer, DeepSpeed strategy, callbacks, checkpoints and exact
resume as ControlNet / Siamese training (``tools/train.py``). State-dict keys are the SD1.5 ones
(``first_stage_model.*``; ``net.model.diffusion_model.*`` …), so the consolidated checkpoints convert directly.
"""

from __future__ import annotations

from ldm.autoencoder import AutoencoderKL
from ldm.model import LatentDiffusion
from ldm.perceptual import PerceptualDistance

import torch
import torch.nn.functional as F
from torch import Tensor

from cldm.lightning import StepLoss, TrainModule, drop_prompts

# Where the UNet stage's loss applies: everywhere (pretraining), the lesion (MedDiff-FT's lesion-focused
# fine-tuning) or the rest (its non-lesion / healthy-background generator).
LOSS_REGIONS: tuple[str, ...] = ("all", "lesion", "background")


def autoencoder_terms(images: Tensor, reconstruction: Tensor, kl: Tensor, kl_weight: float,
                      perceptual: Tensor | None = None, perceptual_weight: float = 0.0) -> StepLoss:
    """The first-stage loss per sample: ``Σ_pixels (|x − x̂| + w_p·d_p) + w_kl·KL``, as ldm sums it (so
    ``kl_weight`` means what it means in SD's configs); the logged terms are per-pixel / per-sample means."""
    pixels = images[0].numel()
    l1 = (images.float() - reconstruction.float()).abs().flatten(1).mean(1)
    rec = l1 if perceptual is None else l1 + perceptual_weight * perceptual
    per_sample = rec * pixels + kl_weight * kl
    terms = {"rec_l1": l1, "kl": kl}
    if perceptual is not None:
        terms["perceptual"] = perceptual
    return StepLoss(per_sample.mean(), terms, {})


class AutoencoderModule(TrainModule):
    """Trains ``first_stage_model`` (every parameter) on the batch's ``image`` in [-1, 1]."""

    def __init__(self, first_stage: AutoencoderKL, *, lr: float, kl_weight: float,
                 perceptual: PerceptualDistance | None = None, perceptual_weight: float = 0.0):
        super().__init__(lr)
        self.first_stage_model = first_stage.requires_grad_(True).train()
        self.kl_weight, self.perceptual_weight = kl_weight, perceptual_weight
        # Outside the module tree: a frozen helper that must not enter checkpoints or the optimizer.
        self._perceptual = [perceptual] if perceptual is not None else []

    def on_fit_start(self) -> None:
        for net in self._perceptual:
            net.to(self.device)

    def step_loss(self, batch: dict, step: int) -> StepLoss:
        images = batch["image"].to(self.first_stage_model.quant_conv.weight.dtype)
        reconstruction, posterior = self.first_stage_model(images)
        perceptual = self._perceptual[0](images, reconstruction) if self._perceptual else None
        return autoencoder_terms(images, reconstruction, posterior.kl().float(), self.kl_weight, perceptual,
                                 self.perceptual_weight)

    @torch.no_grad()
    def image_columns(self, samples: dict, *, steps: int, cfg_scale: float, generator: torch.Generator,
                      sampler: str = "ddim") -> list[Tensor]:
        """image | reconstruction (the posterior mode)."""
        images = samples["image"].to(self.first_stage_model.quant_conv.weight.dtype)
        return [images, self.first_stage_model.decode(self.first_stage_model.encode(images).mode()).clamp(-1, 1)]


class LatentDiffusionModule(TrainModule):
    """Trains the whole UNet of ``net`` (time embedding, encoder, middle and decoder) with the ε-prediction loss."""

    def __init__(self, net: LatentDiffusion, *, lr: float, prompt_dropout: float, loss_region: str = "all"):
        super().__init__(lr)
        if loss_region not in LOSS_REGIONS:
            raise ValueError(f"loss region {loss_region!r} is not one of {list(LOSS_REGIONS)}")
        self.net = net
        net.requires_grad_(False)
        net.unet.requires_grad_(True)
        self.prompt_dropout = prompt_dropout
        self.loss_region = loss_region

    def region_weight(self, batch: dict, latent_size: tuple[int, int]) -> Tensor | None:
        """MedDiff-FT's lesion-focused loss (Xie et al. 2025, eq. 1: ``‖M ⊙ (X̂_θ − X)‖²``), applied to the ε
        regression SD is trained with: ``M`` is the mask's share of each latent pixel (``lesion``) or its complement
        (``background``: the non-lesion generator). The squared error is averaged over all latent elements, as the
        equation's norm sums over the image: a sample with a small lesion contributes a small loss."""
        if self.loss_region == "all":
            return None
        if "mask_hint" not in batch:
            raise ValueError(f"pretrain.unet.loss_region {self.loss_region!r} needs masks: data.root must be a "
                             "prompt.json dataset of image-mask pairs (or null: generated pairs)")
        share = F.adaptive_avg_pool2d(batch["mask_hint"][:, :1].float(), latent_size)
        return share if self.loss_region == "lesion" else 1.0 - share

    def step_loss(self, batch: dict, step: int) -> StepLoss:
        net = self.net
        prompts = drop_prompts(list(batch["prompt"]), self.prompt_dropout if self.training else 0.0)
        z0 = net.encode_images(batch["image"])
        dtype = net.unet.dtype  # bf16 under DeepSpeed's bf16 mode, which casts the whole model
        context = net.encode_prompts(prompts).to(dtype)
        t = torch.randint(0, net.schedule.num_timesteps, (z0.shape[0],), device=z0.device)
        noise = torch.randn_like(z0)
        z_t = net.schedule.q_sample(z0, t, noise).to(dtype)
        error = (net.eps(z_t, t, context).float() - noise.float()).pow(2)
        weight = self.region_weight(batch, tuple(z0.shape[-2:]))
        per_sample = (error if weight is None else weight.to(error.device) * error).flatten(1).mean(1)
        return StepLoss(per_sample.mean(), {"loss_simple" if weight is None else "loss_region": per_sample}, {})

    @torch.no_grad()
    def image_columns(self, samples: dict, *, steps: int, cfg_scale: float, generator: torch.Generator,
                      sampler: str = "ddim") -> list[Tensor]:
        """a training image | a sample for its prompt (classifier-free guidance on the text)."""
        images = samples["image"]
        generated = self.net.sample(list(samples["prompt"]), tuple(images.shape[-2:]), steps=steps,
                                    cfg_scale=cfg_scale, generator=generator, sampler=sampler)
        return [images, generated]


@torch.no_grad()
def latent_scale_factor(first_stage: AutoencoderKL, images: Tensor, batch_size: int = 64) -> float:
    """``1 / std`` of posterior samples of ``images`` (unscaled latents): the factor that gives the diffusion model
    unit-variance latents, how SD's 0.18215 was chosen."""
    latents = [first_stage.encode(images[i:i + batch_size]).sample() for i in range(0, len(images), batch_size)]
    return float(1.0 / torch.cat(latents).float().std())
