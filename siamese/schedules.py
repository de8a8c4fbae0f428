"""Step-dependent quantities of the Siamese recipe, computed from the configured total steps (never a trainer).

* image-control ramp ``w_i(s) = s / S`` (released code: ``global_step / max_steps``), clamped to [0, 1];
* L_aug step gate: active once ``s > S · aug_start`` (released: ``S / 3``);
* L_aug sample gate: ``t ≤ aug_t_max`` (released: 200).

Taking S from the recipe keeps resume, evaluation and tests independent of a Lightning ``Trainer``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config schema imports this module without torch
    from torch import Tensor

AUG_NOISE_CHOICES = ("same", "fresh")
RAMP_CHOICES = ("linear", "constant")


@dataclass(frozen=True)
class SiameseRecipe:
    """The Siamese-specific hyper-parameters (defaults: the released code)."""

    total_steps: int = 3000
    mask_control_weight: float = 1.0  # w_m
    image_control_weight: float = 1.0  # the ramp's final value (w_i(S))
    image_ramp: str = "linear"  # linear: w_i(s) = weight · s/S; constant: w_i(s) = weight
    aug_start: float = 1.0 / 3.0  # L_aug from s > S · aug_start
    aug_t_max: int = 200  # L_aug only for samples with t ≤ aug_t_max
    aug_noise: str = "same"  # re-noise ẑ0 with the same ε (released) or a fresh draw

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"siamese.total_steps must be > 0, got {self.total_steps}")
        if self.image_ramp not in RAMP_CHOICES:
            raise ValueError(f"siamese.image_ramp: {self.image_ramp!r} is not one of {RAMP_CHOICES}")
        if self.aug_noise not in AUG_NOISE_CHOICES:
            raise ValueError(f"siamese.aug_noise: {self.aug_noise!r} is not one of {AUG_NOISE_CHOICES}")
        if not 0.0 <= self.aug_start <= 1.0:
            raise ValueError(f"siamese.aug_start must be in [0, 1], got {self.aug_start}")

    def image_weight(self, step: int) -> float:
        """``w_i(s)``: the weight of the image control inside ``c_mix``."""
        if self.image_ramp == "constant":
            return self.image_control_weight
        return self.image_control_weight * min(max(step / self.total_steps, 0.0), 1.0)

    def aug_active(self, step: int) -> bool:
        """Step gate of L_aug: strictly after ``aug_start`` of the run."""
        return step > self.total_steps * self.aug_start

    def aug_samples(self, t: Tensor) -> Tensor:
        """Sample gate of L_aug: boolean (B,) mask of ``t ≤ aug_t_max``."""
        return t <= self.aug_t_max
