"""Base pretraining (``python -m tools.pretrain``): the loss maths, the perceptual term from a local file, the two
stages through the real trainer (Lightning + DeepSpeed ZeRO-2 on CPU), and the output's SD1.5 compatibility with
``tool_add_control.py`` (the same path ``v1-5-pruned.ckpt`` takes)."""

from __future__ import annotations

import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)
from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict
from ldm.perceptual import PerceptualDistance, vgg16_features

import cv2
import numpy as np
import pytest
import torch

from cldm.convert import expected_state
from cldm.pretrain import autoencoder_terms
from siamese.config import ConfigError, config_from_metadata, load_config, stage_config
from siamese.data.datasets import ImageDataset
from siamese.data.synthetic import synthetic_pair
from siamese.factory import build_latent_diffusion, build_model, load_weights, meta_model
from tools import add_control as add_control_tool
from tools import pretrain as pretrain_tool

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base_tiny.yaml"
TINY = REPO / "configs" / "siamese_tiny.yaml"


def _overrides(out: Path, **extra: object) -> list[str]:
    base = {"train.output_dir": str(out), "data.synthetic_samples": 8, "train.checkpoint_every": 2,
            "train.image_log_every": 2, "sample.steps": 2,
            "pretrain.autoencoder.total_steps": 2, "pretrain.autoencoder.batch_size": 2,
            "pretrain.autoencoder.calibrate_samples": 8,
            "pretrain.unet.total_steps": 3, "pretrain.unet.batch_size": 2}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_autoencoder_loss_is_the_pixel_summed_l1_plus_weighted_kl():
    x = torch.zeros(2, 3, 4, 4)
    rec = torch.full((2, 3, 4, 4), 0.5)
    kl = torch.tensor([10.0, 30.0])
    out = autoencoder_terms(x, rec, kl, kl_weight=0.01)
    # Σ_pixels |x − x̂| = 48 · 0.5 = 24 per sample; + 0.01 · KL → 24.1 and 24.3; batch mean 24.2.
    assert out.loss.item() == pytest.approx(24.2)
    assert out.terms["rec_l1"].tolist() == [0.5, 0.5]
    with_p = autoencoder_terms(x, rec, kl, kl_weight=0.0, perceptual=torch.tensor([0.25, 0.25]),
                               perceptual_weight=2.0)
    assert with_p.loss.item() == pytest.approx(48 * (0.5 + 2.0 * 0.25))


def test_perceptual_distance_from_a_local_vgg16_file(tmp_path):
    torch.manual_seed(0)
    features = vgg16_features()
    path = tmp_path / "vgg16.safetensors"
    save_state_dict({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    dist = PerceptualDistance.from_file(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert dist(x, x).abs().max().item() < 1e-6
    d = dist(x, y)
    assert d.shape == (2,) and bool((d > 0).all())
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dist.parameters())
    with pytest.raises(FileNotFoundError, match="perceptual weights not found"):
        PerceptualDistance.from_file(tmp_path / "missing.pth")
    save_state_dict({"0.weight": torch.zeros(3)}, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        PerceptualDistance.from_file(tmp_path / "bad.safetensors")


def test_config_rules_for_pretraining(tmp_path):
    cfg = load_config(BASE)
    stage = stage_config(cfg, "unet")
    assert (stage.train.total_steps, stage.train.lr, stage.train.batch_size) == (
        cfg.pretrain.unet.total_steps, cfg.pretrain.unet.lr, cfg.pretrain.unet.batch_size)
    assert stage.train.output_dir == str(Path(cfg.train.output_dir) / "unet")
    with pytest.raises(ConfigError, match="perceptual_weights"):
        load_config(BASE, ["pretrain.autoencoder.perceptual_weight=1.0"])
    with pytest.raises(ConfigError, match="pretrain.unet.total_steps must be > 0"):
        load_config(BASE, ["pretrain.unet.total_steps=0"])


def test_base_training_trains_the_encoder_too_controlnet_training_does_not():
    cfg = load_config(BASE)
    net = build_latent_diffusion(cfg.model)
    z = torch.randn(2, 4, 8, 8)
    net.eps(z, torch.tensor([3, 700]), torch.randn(2, 77, 32)).pow(2).mean().backward()
    assert net.unet.input_blocks[1][0].in_layers[2].weight.grad is not None
    assert net.unet.time_embed[0].weight.grad is not None
    model = build_model(cfg.model)
    model.configure_trainable(sd_locked=False)
    model.eps(z, torch.tensor([3, 700]), torch.randn(2, 77, 32), torch.rand(2, 3, 64, 64)).pow(2).mean().backward()
    assert model.unet.input_blocks[1][0].in_layers[2].weight.grad is None


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert pretrain_tool.main(["--config", str(BASE), *_overrides(out)]) == 0
    return out


def test_pretraining_writes_an_sd15_layout_base_with_the_calibrated_scale(pretrained):
    base_file = pretrained / "base.safetensors"
    state = load_state_dict(base_file)
    cfg = config_from_metadata(read_metadata(base_file), str(base_file))
    assert cfg is not None and read_metadata(base_file)["siamese.kind"] == "base"
    with torch.device("meta"):
        expected = build_latent_diffusion(cfg.model).state_dict()
    assert set(state) == set(expected)  # model.diffusion_model.*, first_stage_model.*, cond_stage_model.*, buffers
    assert all(state[k].shape == expected[k].shape for k in state)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    # The stages ran through the trainer: ZeRO checkpoints, the stage config and image grids in each stage dir.
    for stage, steps in (("autoencoder", 2), ("unet", 3)):
        assert (pretrained / stage / "checkpoints" / f"step={steps}.ckpt" / "latest").is_file()
        assert load_config(pretrained / stage / "config.yaml").train.total_steps == steps
        assert (pretrained / stage / "images" / "step_0000002.png").is_file()
    # The scale factor is 1/std of the trained VAE's latents, recorded in both stage outputs.
    ae_cfg = config_from_metadata(read_metadata(pretrained / "autoencoder.safetensors"), "ae")
    assert ae_cfg.model.first_stage.scale_factor == cfg.model.first_stage.scale_factor != 0.18215
    # The exported first stage is the trained one (not the initialisation).
    vae = load_state_dict(pretrained / "autoencoder.safetensors")
    assert all(torch.equal(vae[k], state[k]) for k in vae)


def test_tool_add_control_takes_the_pretrained_base(pretrained, tmp_path, caplog):
    base_file = pretrained / "base.safetensors"
    scale = config_from_metadata(read_metadata(base_file), "base").model.first_stage.scale_factor
    init = tmp_path / "init.safetensors"
    # The config must use the base's latent scale: refused otherwise, with the key to set.
    caplog.set_level(logging.ERROR)
    assert add_control_tool.main([str(base_file), str(init), "--config", str(TINY)]) == 2
    assert f"model.first_stage.scale_factor={scale}" in caplog.text and not init.exists()
    assert add_control_tool.main([str(base_file), str(init), "--config", str(TINY),
                                  f"model.first_stage.scale_factor={scale}"]) == 0
    cfg = load_config(TINY, [f"model.first_stage.scale_factor={scale}"])
    model = build_model(cfg.model)
    load_weights(model, init)
    base = load_state_dict(base_file)
    ours = model.state_dict()
    assert set(ours) == set(expected_state(meta_model(cfg.model)))
    for key, value in base.items():
        assert torch.equal(ours[key], value), key
    # ControlNet copied from the pretrained UNet encoder.
    assert torch.equal(ours["control_model.input_blocks.1.0.in_layers.2.weight"],
                       base["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"])


def test_rerun_skips_finished_stages_and_refuses_mixing(pretrained, caplog):
    caplog.set_level(logging.INFO)
    before = (pretrained / "base.safetensors").stat().st_mtime_ns
    assert pretrain_tool.main(["--config", str(BASE), *_overrides(pretrained)]) == 0
    assert "stage autoencoder: already done" in caplog.text and "stage unet: already done" in caplog.text
    assert (pretrained / "base.safetensors").stat().st_mtime_ns == before


def test_unet_stage_alone_needs_a_first_stage(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert pretrain_tool.main(["--config", str(BASE), "--stage", "unet", *_overrides(tmp_path)]) == 2
    assert "run --stage autoencoder" in caplog.text


def test_stage_with_checkpoints_needs_resume_or_force(tmp_path, caplog):
    (tmp_path / "autoencoder" / "checkpoints" / "step=2.ckpt").mkdir(parents=True)
    caplog.set_level(logging.ERROR)
    assert pretrain_tool.main(["--config", str(BASE), "--stage", "autoencoder", *_overrides(tmp_path)]) == 2
    assert "--resume latest" in caplog.text and "--force" in caplog.text


def test_image_dataset_reads_a_plain_folder_and_a_prompt_file(tmp_path):
    for i in range(3):
        rgb, _ = synthetic_pair(i, 40, seed=5)
        sub = tmp_path / ("a" if i else "b")
        sub.mkdir(exist_ok=True)
        cv2.imwrite(str(sub / f"img{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (tmp_path / ".hidden").mkdir()
    cv2.imwrite(str(tmp_path / ".hidden" / "x.png"), np.zeros((8, 8, 3), np.uint8))
    ds = ImageDataset.from_root(tmp_path, 32, prompt="tissue")
    assert len(ds) == 3 and ds[0]["image"].shape == (3, 32, 32) and ds[0]["prompt"] == "tissue"
    assert float(ds[0]["image"].min()) >= -1 and float(ds[0]["image"].max()) <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no prompt.json and no images"):
        ImageDataset.from_root(tmp_path / "empty", 32, prompt="x")


def test_resume_latest_continues_a_stage_and_starts_the_next(tmp_path):
    # The first stage ran 2 of its steps (its run stopped there), the UNet stage never started.
    assert pretrain_tool.main(["--config", str(BASE), "--stage", "autoencoder",
                               *_overrides(tmp_path, **{"pretrain.autoencoder.total_steps": 2})]) == 0
    (tmp_path / "autoencoder.safetensors").unlink()  # as if the stage had been interrupted after its checkpoint
    assert pretrain_tool.main(["--config", str(BASE), "--resume", "latest",
                               *_overrides(tmp_path, **{"pretrain.autoencoder.total_steps": 3})]) == 0
    assert (tmp_path / "autoencoder" / "checkpoints" / "step=3.ckpt").is_dir()  # continued from step 2 to 3
    assert (tmp_path / "base.safetensors").is_file()  # and the UNet stage started fresh and finished
