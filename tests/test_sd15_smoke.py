"""SD1.5 geometry end to end on a small canvas (slow: builds the 1.4 B-parameter model with random weights).

The tiny config shares the code path, but only the SD1.5 geometry has 4 UNet levels, 8 heads, the 768-wide CLIP
tower with QuickGELU and the 128-channel VAE: one guided DDIM sample of a 64×64 mask and one Siamese training
step run through all of them. ``python -m pytest -m slow tests/test_sd15_smoke.py`` (≈ 1 min, ≈ 12 GB RAM).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from siamese.config import load_config
from siamese.factory import build_method, build_model

pytestmark = pytest.mark.slow
SD15 = Path(__file__).resolve().parents[1] / "configs" / "siamese_sd15.yaml"


@pytest.fixture(scope="module")
def sd15():
    cfg = load_config(SD15, ["data.resolution=64"])
    return cfg, build_model(cfg.model)


def test_sd15_guided_sample(sd15):
    _, model = sd15
    hint = torch.zeros(1, 3, 64, 64)
    hint[:, :, 16:48, 16:48] = 1.0
    images = model.eval().sample(hint, ["A photo of a polyp."], steps=2, cfg_scale=9.0,
                                 generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_sd15_siamese_training_step(sd15):
    cfg, model = sd15
    model.train().configure_trainable(sd_locked=False)
    method = build_method(cfg, model)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z0 = model.encode_images(images, g)
    mask = (torch.rand(1, 1, 64, 64, generator=g) > 0.5).float().expand(1, 3, 64, 64)
    out = method.training_loss(z0, mask, (images + 1) / 2, model.encode_prompts(["A photo of a polyp."]),
                               torch.tensor([50]), torch.randn(z0.shape, generator=g), step=2500)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.terms) == {"loss_mask", "loss_image", "loss_consistency", "loss_aug"}
    # Freshly initialised, the UNet's last conv is zero, so only it receives a gradient yet (trained weights pass
    # gradients on to the decoder and the ControlNet).
    assert model.unet.out[-1].weight.grad.abs().sum() > 0
