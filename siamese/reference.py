"""The released Siamese loss, deep copies and all: the reference the copy-free ``siamese.model`` is checked against
(``tests/test_siamese_parity.py``) and measured against (``bench/train_step.py``). Never used for training.

As in the released ``p_losses``: the ControlNet and the UNet are deep-copied on every call; ``sg(c_m)`` is the
copied ControlNet's output under ``no_grad``; the image branch runs through the copied UNet (``U_sg``); L_aug runs on
the full batch and is gated by multiplying with ``t ≤ aug_t_max``.
"""

from __future__ import annotations

import copy

from ldm.schedule import Schedule
from ldm.unet import UNetModel

import torch
from torch import Tensor

from cldm.controlnet import ControlNet
from siamese.losses import TERMS, LossWeights, mse_per_sample
from siamese.schedules import SiameseRecipe


def deep_copy_loss(unet: UNetModel, control: ControlNet, schedule: Schedule, weights: LossWeights,
                   recipe: SiameseRecipe, step: int, z0: Tensor, mask_hint: Tensor, image_hint: Tensor,
                   context: Tensor, t: Tensor, noise: Tensor,
                   aug_noise: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(total loss, per-sample terms) the way the released code computes them."""
    only_mid = control.control_config.only_mid_control
    control_copy, unet_copy = copy.deepcopy(control), copy.deepcopy(unet)
    z_t = schedule.q_sample(z0, t, noise)

    c_m = control(z_t, mask_hint, t, context)
    eps_m = unet(z_t, t, context, c_m, only_mid)
    with torch.no_grad():
        c_m_sg = control_copy(z_t, mask_hint, t, context)
    c_i = control(z_t, image_hint, t, context)
    w_m, w_i = recipe.mask_control_weight, recipe.image_weight(step)
    eps_mix = unet_copy(z_t, t, context, [w_m * a + w_i * b for a, b in zip(c_m_sg, c_i, strict=True)], only_mid)

    terms = {"loss_mask": mse_per_sample(eps_m, noise), "loss_image": mse_per_sample(eps_mix, noise),
             "loss_consistency": mse_per_sample(eps_m, eps_mix.detach()),
             "loss_aug": torch.zeros(len(t), device=t.device)}
    if step > recipe.total_steps * recipe.aug_start:
        if recipe.aug_noise == "fresh" and aug_noise is None:
            raise ValueError("recipe.aug_noise='fresh' needs aug_noise")
        target = aug_noise if recipe.aug_noise == "fresh" else noise
        z0_hat = schedule.predict_x0_from_eps(z_t, t, eps_mix)
        z_aug = schedule.q_sample(z0_hat, t, target).detach()
        eps_aug = unet(z_aug, t, context, control(z_aug, mask_hint, t, context), only_mid)
        terms["loss_aug"] = mse_per_sample(eps_aug, target) * (t <= recipe.aug_t_max).float()
    total = sum(weights.of(name) * terms[name] for name in TERMS).mean()
    return total, terms
