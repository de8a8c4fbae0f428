"""Twin-branch Siamese-Diffusion: Mask-Diffusion and Image-Diffusion sharing one ControlNet and one UNet.

The released implementation deep-copies the ControlNet and the UNet on every step (≈1.2 B parameters at SD1.5) to
obtain the stopped control ``sg(c_m)`` and the stopped UNet ``U_sg``. This module computes the same loss and the
same gradients without copies (``tests/test_siamese_parity.py`` proves it against a deep-copy reference):

* ``sg(c_m)`` is the mask branch's own control, detached (same inputs, no dropout at these settings);
* ``U_sg`` is a shadow UNet cloned on the meta device (no memory; LoRA adapters included) whose decoder parameter
  slots are filled, before every call, with the live parameters detached (same storage, no copy): the L_mix
  gradient reaches ``c_i`` (hence the ControlNet) but never the UNet (nor its LoRA adapters). Unlike
  ``torch.func.functional_call``, the shadow keeps those detached weights until the next call, so
  gradient-checkpoint recomputation during backward sees exactly the forward's weights;
* the UNet encoder runs without autograd in both branches on the same (z_t, t, τ), so it is computed once;
* the ControlNet runs once on the stacked [mask hint; image hint] batch (2B) — per-sample identical;
* L_aug is evaluated only on the samples its gate keeps (t ≤ 200): the others contribute exactly 0.

Only the decoder parameters are passed detached; under ZeRO-2 parameters are whole on every rank, so this holds
(ZeRO-3/FSDP would need a gather first).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from ldm.schedule import Schedule
from ldm.unet import EncoderFeatures, UNetModel

import torch
from torch import Tensor, nn

from cldm.controlnet import ControlNet
from siamese.losses import LossWeights, siamese_terms, total_loss
from siamese.schedules import SiameseRecipe


def meta_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s structure (adapters such as LoRA layers included) whose parameters and buffers are on
    the meta device: ``deepcopy`` with every tensor pre-mapped in the memo, so no weight is copied."""
    memo: dict[int, object] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


class StoppedUNet:
    """``U_sg``: the UNet decoder with stopped weights, sharing storage with the live UNet."""

    def __init__(self, unet: UNetModel):
        self.shadow = meta_clone(unet)
        self.shadow.requires_grad_(False)
        self.slots = []
        for name in unet.decoder_parameters():
            owner, _, leaf = name.rpartition(".")
            self.slots.append((self.shadow.get_submodule(owner), leaf, name))

    def __call__(self, unet: UNetModel, features: EncoderFeatures, context: Tensor, control: Sequence[Tensor],
                 only_mid_control: bool) -> Tensor:
        live = unet.decoder_parameters()
        for module, leaf, name in self.slots:
            module._parameters[leaf] = nn.Parameter(live[name].detach(), requires_grad=False)
        self.shadow.train(unet.training)
        self.shadow.set_gradient_checkpointing(getattr(unet, "gradient_checkpointing", False))
        return self.shadow.decode(features, context, control, only_mid_control)


@dataclass
class SiameseOutput:
    """Result of one loss evaluation: the scalar to minimise, per-sample terms and values worth logging."""

    loss: Tensor
    terms: dict[str, Tensor]  # per-sample, shape (B,)
    image_weight: float
    aug_active: bool
    aug_share: float  # share of the batch inside the L_aug sample gate (t ≤ aug_t_max)


def _cat(*pairs: Tensor) -> Tensor:
    return torch.cat(pairs, dim=0)


class SiameseDiffusion:
    """The method: computes the Siamese training loss from explicit tensors with the shared networks.

    A plain object, not an ``nn.Module``: it refers to networks owned by the full model (``cldm.model.ControlLDM``),
    so state dicts keep the original key names and never hold the networks twice. ``schedule`` must live on the
    device of the inputs (``to(device)`` moves it).
    """

    def __init__(self, unet: UNetModel, control: ControlNet, schedule: Schedule, weights: LossWeights,
                 recipe: SiameseRecipe):
        if control.num_residuals != unet.num_control_residuals:
            raise ValueError(f"ControlNet gives {control.num_residuals} residuals, the UNet takes "
                             f"{unet.num_control_residuals}")
        self.unet = unet
        self.control = control
        self.schedule = schedule
        self.weights = weights
        self.recipe = recipe
        self.only_mid_control = control.control_config.only_mid_control
        self._stopped = StoppedUNet(unet)

    def to(self, device: torch.device | str) -> SiameseDiffusion:
        self.schedule = self.schedule.to(device)
        return self

    # -- the two networks as the branches use them ------------------------------------------------------------------
    def eps(self, z_t: Tensor, t: Tensor, context: Tensor, control: Sequence[Tensor] | None,
            features: EncoderFeatures | None = None) -> Tensor:
        """ε prediction of the (trainable) controlled UNet."""
        return self.unet(z_t, t, context, control, self.only_mid_control, features)

    def eps_stopped(self, z_t: Tensor, t: Tensor, context: Tensor, control: Sequence[Tensor],
                    features: EncoderFeatures | None = None) -> Tensor:
        """ε prediction with the UNet's weights stopped (``U_sg``): gradients flow to ``control`` only."""
        if features is None:
            features = self.unet.encode(z_t, t, context)
        return self._stopped(self.unet, features, context, control, self.only_mid_control)

    def eps_mask(self, z_t: Tensor, t: Tensor, context: Tensor, mask_hint: Tensor) -> Tensor:
        """Mask-Diffusion ε prediction: the only branch used for sampling."""
        return self.eps(z_t, t, context, self.control(z_t, mask_hint, t, context))

    # -- the loss ---------------------------------------------------------------------------------------------------
    def training_loss(self, z0: Tensor, mask_hint: Tensor, image_hint: Tensor, context: Tensor, t: Tensor,
                      noise: Tensor, step: int, aug_noise: Tensor | None = None) -> SiameseOutput:
        """The Siamese loss at training step ``step`` for explicit inputs (no trainer involved).

        ``aug_noise`` is the fresh noise for L_aug when ``recipe.aug_noise == "fresh"`` (shape of ``noise``).
        """
        w, recipe = self.weights, self.recipe
        dtype = self.unet.dtype  # the networks' dtype (no-op in fp32; bf16 under DeepSpeed's bf16 mode)
        z_t = self.schedule.q_sample(z0, t, noise).to(dtype)
        context, mask_hint, image_hint = context.to(dtype), mask_hint.to(dtype), image_hint.to(dtype)
        features = self.unet.encode(z_t, t, context)  # no autograd; shared by both branches
        image_weight = recipe.image_weight(step)

        if w.needs_image_branch:
            both = self.control(_cat(z_t, z_t), _cat(mask_hint, image_hint), _cat(t, t), _cat(context, context))
            c_mask, c_image = zip(*(c.chunk(2, dim=0) for c in both), strict=True)
        else:
            c_mask, c_image = self.control(z_t, mask_hint, t, context), None
        eps_mask = self.eps(z_t, t, context, c_mask, features)

        eps_mix = None
        if c_image is not None:
            w_m = recipe.mask_control_weight
            c_mix = [w_m * cm.detach() + image_weight * ci for cm, ci in zip(c_mask, c_image, strict=True)]
            eps_mix = self.eps_stopped(z_t, t, context, c_mix, features)

        aug_active = w.aug > 0 and recipe.aug_active(step)
        aug_gate = recipe.aug_samples(t)
        eps_aug = aug_target = None
        if aug_active and eps_mix is not None and bool(aug_gate.any()):
            eps_aug, aug_target = self._aug_branch(z_t, t, context, mask_hint, eps_mix, noise, aug_noise, aug_gate)

        terms = siamese_terms(noise, eps_mask, eps_mix, eps_aug, aug_target, aug_gate)
        return SiameseOutput(total_loss(terms, w), terms, image_weight, aug_active,
                             float(aug_gate.float().mean()))

    def _aug_branch(self, z_t: Tensor, t: Tensor, context: Tensor, mask_hint: Tensor, eps_mix: Tensor,
                    noise: Tensor, aug_noise: Tensor | None, gate: Tensor) -> tuple[Tensor, Tensor]:
        """Online augmentation: re-noise the image branch's z₀ estimate and denoise it with the mask branch."""
        if self.recipe.aug_noise == "fresh":
            if aug_noise is None:
                raise ValueError("recipe.aug_noise='fresh' needs aug_noise")
            target = aug_noise[gate]
        else:
            target = noise[gate]
        t_sel, z_sel = t[gate], z_t[gate]
        with torch.no_grad():  # z_t' is a stopped input (sg in the method)
            z0_hat = self.schedule.predict_x0_from_eps(z_sel, t_sel, eps_mix[gate])
            z_aug = self.schedule.q_sample(z0_hat, t_sel, target).to(z_sel.dtype)
        ctx, hint = context[gate], mask_hint[gate]
        return self.eps(z_aug, t_sel, ctx, self.control(z_aug, hint, t_sel, ctx)), target
