"""The Siamese-Diffusion objective as pure functions over tensors (Qiu et al., CVPR 2025, Sec. 3; released code).

Notation (paper → code):

====================  =====================  ==============================================================
paper                 code                   meaning
====================  =====================  ==============================================================
ε                     ``noise``              the Gaussian noise mixed into z₀ at step t
ε_θ(z_t, c_m)         ``eps_mask``           Mask-Diffusion prediction (mask hint only)
ε_θ(z_t, c_mix)       ``eps_mix``            Image-Diffusion prediction, UNet weights stopped,
                                             control ``c_mix = w_m·sg(c_m) + w_i(s)·c_i``
ε_θ(z_t', c_m)        ``eps_aug``            Mask-Diffusion on the re-noised Image-Diffusion estimate of z₀
L_m                   ``loss_mask``          ‖eps_mask − ε‖²
L_mix                 ``loss_image``         ‖eps_mix − ε‖²
L_nc                  ``loss_consistency``   ‖eps_mask − sg(eps_mix)‖²   (noise consistency)
L_aug                 ``loss_aug``           ‖eps_aug − ε‖²·1[t ≤ 200]   (online augmentation; gated by step)
====================  =====================  ==============================================================

Every ‖·‖² is a per-sample mean over C, H, W. The total is the batch mean of the weighted per-sample sum. The
masked L_aug is averaged over the whole batch (released behaviour: its effective weight is the share of samples
with t ≤ 200, ≈ 0.2). No trainer, step counter or logging lives here; the step-dependent values (ramp, gates) come
from ``siamese.schedules``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config schema imports this module without torch
    from torch import Tensor

TERMS = ("loss_mask", "loss_image", "loss_consistency", "loss_aug")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the four terms. (1, 0, 0, 0) is plain ControlNet training on the mask hint."""

    mask: float = 1.0
    image: float = 1.0
    consistency: float = 1.0
    aug: float = 1.0

    def __post_init__(self) -> None:
        for name in ("mask", "image", "consistency", "aug"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.weights.{name} must be ≥ 0, got {getattr(self, name)}")

    def of(self, term: str) -> float:
        return {"loss_mask": self.mask, "loss_image": self.image, "loss_consistency": self.consistency,
                "loss_aug": self.aug}[term]

    @property
    def needs_image_branch(self) -> bool:
        """The image branch (ε_mix) feeds L_mix, L_nc and the input of L_aug."""
        return self.image > 0 or self.consistency > 0 or self.aug > 0


def mse_per_sample(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every dimension but the batch: shape (B,). Computed in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def siamese_terms(noise: Tensor, eps_mask: Tensor, eps_mix: Tensor | None = None, eps_aug: Tensor | None = None,
                  aug_target: Tensor | None = None, aug_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample terms, each of shape (B,). A term whose input is ``None`` is zeros (weight 0 or gate closed).

    ``eps_aug`` and ``aug_target`` (the noise z_t' was made with) cover only the samples selected by the boolean
    ``aug_mask`` of shape (B,); every other sample contributes 0 to L_aug.
    """
    loss_mask = mse_per_sample(eps_mask, noise)
    zeros = loss_mask.new_zeros(loss_mask.shape)
    terms = {"loss_mask": loss_mask, "loss_image": zeros, "loss_consistency": zeros, "loss_aug": zeros}
    if eps_mix is not None:
        terms["loss_image"] = mse_per_sample(eps_mix, noise)
        # Noise consistency: pull the mask branch towards the image branch, never the other way round.
        terms["loss_consistency"] = mse_per_sample(eps_mask, eps_mix.detach())
    if eps_aug is not None:
        if aug_mask is None or aug_target is None:
            raise ValueError("eps_aug needs aug_target and aug_mask")
        terms["loss_aug"] = zeros.masked_scatter(aug_mask, mse_per_sample(eps_aug, aug_target))
    return terms


def total_loss(terms: dict[str, Tensor], weights: LossWeights) -> Tensor:
    """Batch mean of the weighted per-sample sum. Zero-weight terms are left out (not multiplied by 0)."""
    total = None
    for name in TERMS:
        w = weights.of(name)
        if w == 0:
            continue
        part = terms[name] if w == 1 else w * terms[name]
        total = part if total is None else total + part
    if total is None:
        raise ValueError("all loss weights are 0: nothing to train")
    return total.mean()
