"""MedDiff-FT's lesion-focused fine-tuning (eq. 1) and its non-lesion generator: the UNet stage of tools.pretrain
with the loss restricted to the lesion (or to the rest), from a base, on image-mask pairs
(configs/meddiff_ft_tiny.yaml)."""

from __future__ import annotations

from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)
from ldm.checkpoint import load_state_dict, read_metadata

import pytest
import torch

from cldm.pretrain import LatentDiffusionModule
from siamese.config import ConfigError, config_from_metadata, load_config
from siamese.factory import build_latent_diffusion
from tools import pretrain as pretrain_tool

REPO = Path(__file__).resolve().parents[1]
PRESET = REPO / "configs" / "meddiff_ft_tiny.yaml"
SHIPPED = REPO / "data" / "pretrained" / "base_tiny.safetensors"


def _batch(mask: torch.Tensor) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "prompt": ["An image of hta"] * 2,
            "mask_hint": mask.expand(2, 3, 64, 64)}


def _loss(region: str, mask: torch.Tensor) -> torch.Tensor:
    cfg = load_config(PRESET)
    torch.manual_seed(0)
    net = build_latent_diffusion(cfg.model)
    with torch.no_grad():
        for p in net.unet.parameters():  # a fresh UNet's zero output layer would make every error the same
            p.add_(0.02 * torch.randn_like(p))
    module = LatentDiffusionModule(net, lr=1e-4, prompt_dropout=0.0, loss_region=region)
    torch.manual_seed(1)  # the same t and noise for every call
    return module.step_loss(_batch(mask), 0).terms


def test_the_loss_covers_exactly_its_region():
    lesion = torch.zeros(1, 1, 64, 64)
    lesion[..., 16:40, 8:32] = 1.0
    whole = _loss("all", lesion)["loss_simple"]
    inside, outside = _loss("lesion", lesion)["loss_region"], _loss("background", lesion)["loss_region"]
    torch.testing.assert_close(inside + outside, whole, rtol=1e-5, atol=1e-7)  # the two regions partition it
    assert (inside > 0).all() and (outside > inside).all()  # the lesion is 14 % of the image
    assert not _loss("lesion", torch.zeros(1, 1, 64, 64))["loss_region"].any()  # no lesion: nothing to learn
    torch.testing.assert_close(_loss("lesion", torch.ones(1, 1, 64, 64))["loss_region"], whole)
    with pytest.raises(ValueError, match="loss region 'skin' is not one of"):
        LatentDiffusionModule(build_latent_diffusion(load_config(PRESET).model), lr=1e-4, prompt_dropout=0.0,
                              loss_region="skin")
    with pytest.raises(ConfigError, match="pretrain.unet.loss_region 'skin'"):
        load_config(PRESET, ["pretrain.unet.loss_region=skin"])


def test_lesion_focused_finetuning_preset_runs_from_the_shipped_base(tmp_path):
    out = tmp_path / "ft"
    overrides = [f"train.output_dir={out}", f"train.init_ckpt={SHIPPED}", "pretrain.unet.total_steps=2",
                 "pretrain.unet.batch_size=2", "data.synthetic_samples=4", "train.log_every=1",
                 "train.image_log_every=0"]
    assert pretrain_tool.main(["--config", str(PRESET), "--stage", "unet", "--out", str(tmp_path / "ft.safetensors"),
                               *overrides]) == 0
    tuned, base = load_state_dict(tmp_path / "ft.safetensors"), load_state_dict(SHIPPED)
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(tuned[k], base[k]) for k in unet)  # the UNet moved
    assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("first_stage_model."))  # VAE kept
    cfg = config_from_metadata(read_metadata(tmp_path / "ft.safetensors"), "ft")
    assert cfg.pretrain.unet.loss_region == "lesion" and cfg.data.prompt == "An image of hta"
    assert cfg.model.first_stage.scale_factor == pytest.approx(0.36235)
    metrics = "".join(p.read_text() for p in (out / "unet").rglob("metrics.csv"))
    assert "train/loss_region" in metrics
