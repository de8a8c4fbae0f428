"""Lightning wiring for ControlNet training (the mask-only baseline); the Siamese module extends it, and the base
pretraining modules (``cldm.pretrain``) share its ``TrainModule`` base.

The module only wires parts together: it turns a batch into latents, text context, timesteps and noise, asks
``loss_terms`` for the loss and per-sample terms, logs them, and owns the optimizer over the trainable set chosen by
``sd_locked`` (``ControlLDM.configure_trainable``). Per-term losses go to Lightning's logger, never to stdout.

Exact resume: Lightning/DeepSpeed restore weights, optimizer state and the step; step-dependent values are pure
functions of that step and the configured total; this module also saves and restores the RNG states.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from cldm.lora import LoraSettings
from cldm.model import ControlLDM


@dataclass(frozen=True)
class TrainSettings:
    """What the training loop needs beyond the model (from ``train`` / ``method`` config sections)."""

    lr: float = 1e-5
    sd_locked: bool = True
    prompt_dropout: float = 0.05
    total_steps: int = 3000
    lora: LoraSettings = field(default_factory=LoraSettings)  # enabled: the decoder trains through LoRA adapters


@dataclass
class StepLoss:
    loss: Tensor
    terms: dict[str, Tensor]  # per-sample values, logged as batch means
    extras: dict[str, float]  # scalars worth logging (ramp value, gate shares, ...)


def make_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW with torch's defaults (the released recipe), in its fused single-kernel form where torch has one for the
    parameters' device and dtype: the same update (Loshchilov & Hutter 2019, Alg. 2) in one pass over each tensor
    instead of about ten; on CPU 5-10x faster than the per-parameter loop (``bench/vs_original.py``)."""
    fused = bool(params) and all(p.is_floating_point() for p in params) and len({p.device for p in params}) == 1
    if fused:
        try:
            return torch.optim.AdamW(params, lr=lr, fused=True)
        except (RuntimeError, ValueError):  # a device without a fused kernel: the default loop
            pass
    return torch.optim.AdamW(params, lr=lr)


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


class TrainModule(pl.LightningModule):
    """What every training module of the framework shares (ControlNet / Siamese, and base pretraining): one
    ``StepLoss`` per step with per-term logging, AdamW over the parameters that require grad, the RNG states in
    checkpoints (exact resume), and ``image_columns`` for the image-logging callback."""

    def __init__(self, lr: float):
        super().__init__()
        self.lr = lr

    def step_loss(self, batch: dict, step: int) -> StepLoss:
        raise NotImplementedError

    @torch.no_grad()
    def image_columns(self, samples: dict, *, steps: int, cfg_scale: float, generator: torch.Generator,
                      sampler: str = "ddim") -> list[Tensor]:
        """Columns of the logged image grid for a few fixed samples, each (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.step_loss(batch, int(self.global_step))
        logs = {f"train/{k}": v.detach().mean() for k, v in out.terms.items()}
        logs.update({f"train/{k}": float(v) for k, v in out.extras.items()})
        self.log_dict(logs, on_step=True, prog_bar=False, sync_dist=False)
        self.log("loss", out.loss.detach(), on_step=True, prog_bar=True)
        return out.loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return make_adamw(params, self.lr)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = _rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("rng_state")
        if state is not None:
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
            torch.set_rng_state(state["torch"])


def drop_prompts(prompts: list[str], p: float) -> list[str]:
    """Each prompt replaced by "" with probability ``p``: the unconditional model classifier-free guidance needs."""
    if p <= 0:
        return prompts
    drop = torch.rand(len(prompts)).lt(p).tolist()
    return ["" if d else prompt for prompt, d in zip(prompts, drop)]


class ControlNetModule(TrainModule):
    """Plain ControlNet training on the mask hint: ``L = ‖ε_θ(z_t, t, τ, c(h_m)) − ε‖²``."""

    def __init__(self, net: ControlLDM, settings: TrainSettings):
        super().__init__(settings.lr)
        self.net = net
        self.settings = settings
        self.trainable_names = net.configure_trainable(settings.sd_locked, settings.lora)
        # LoRA checkpoints hold only the trained parameters (make_strategy's exclude_frozen); the frozen base is
        # already loaded from train.init_ckpt when a run resumes, so the checkpoint is loaded non-strictly.
        self.strict_loading = not settings.lora.enabled

    # -- one step ---------------------------------------------------------------------------------------------------
    def prepare_batch(self, batch: dict) -> dict[str, Tensor]:
        """Batch from the dataset → latents, hints, text context, timesteps and noise (all on this device)."""
        prompts = list(batch["prompt"])
        if self.training:
            prompts = drop_prompts(prompts, self.settings.prompt_dropout)
        z0 = self.net.encode_images(batch["image"])
        context = self.net.encode_prompts(prompts).to(z0.dtype)
        t = torch.randint(0, self.net.schedule.num_timesteps, (z0.shape[0],), device=z0.device)
        return {"z0": z0, "mask_hint": batch["mask_hint"], "image_hint": batch["image_hint"], "context": context,
                "t": t, "noise": torch.randn_like(z0)}

    def loss_terms(self, inputs: dict[str, Tensor], step: int) -> StepLoss:
        net = self.net
        dtype = net.unet.dtype  # no-op in fp32; bf16 under DeepSpeed's bf16 mode, which casts the whole model
        z_t = net.schedule.q_sample(inputs["z0"], inputs["t"], inputs["noise"]).to(dtype)
        eps = net.eps(z_t, inputs["t"], inputs["context"].to(dtype), inputs["mask_hint"].to(dtype))
        per_sample = (eps.float() - inputs["noise"].float()).pow(2).flatten(1).mean(1)
        return StepLoss(per_sample.mean(), {"loss_mask": per_sample}, {})

    def step_loss(self, batch: dict, step: int) -> StepLoss:
        return self.loss_terms(self.prepare_batch(batch), step)

    @torch.no_grad()
    def image_columns(self, samples: dict, *, steps: int, cfg_scale: float, generator: torch.Generator,
                      sampler: str = "ddim") -> list[Tensor]:
        """mask | real image | sample of the mask branch."""
        hint = samples["mask_hint"]
        images = self.net.sample(hint, list(samples["prompt"]), steps=steps, cfg_scale=cfg_scale,
                                 generator=generator, sampler=sampler)
        return [hint * 2 - 1, samples["image"], images]
