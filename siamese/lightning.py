"""Lightning module of Siamese-Diffusion: the ControlNet module with the twin-branch loss.

All method logic is in ``siamese.model.SiameseDiffusion`` (pure, trainer-free); this class only hands it the batch
and the step, and logs the per-term losses, the image-control ramp value and the share of samples with t ≤ 200.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cldm.lightning import ControlNetModule, StepLoss, TrainSettings
from cldm.model import ControlLDM
from siamese.losses import LossWeights
from siamese.model import SiameseDiffusion
from siamese.schedules import SiameseRecipe


class SiameseModule(ControlNetModule):
    def __init__(self, net: ControlLDM, settings: TrainSettings, weights: LossWeights, recipe: SiameseRecipe):
        super().__init__(net, settings)
        self.method = SiameseDiffusion(net.unet, net.control, net.schedule, weights, recipe)

    def loss_terms(self, inputs: dict[str, Tensor], step: int) -> StepLoss:
        method = self.method
        if method.schedule.device != inputs["z0"].device:
            method.to(inputs["z0"].device)
        aug_noise = torch.randn_like(inputs["noise"]) if method.recipe.aug_noise == "fresh" else None
        out = method.training_loss(inputs["z0"], inputs["mask_hint"], inputs["image_hint"], inputs["context"],
                                   inputs["t"], inputs["noise"], step, aug_noise=aug_noise)
        return StepLoss(out.loss, out.terms, {"image_weight": out.image_weight, "aug_active": float(out.aug_active),
                                               "aug_share": out.aug_share})
