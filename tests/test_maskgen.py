"""MedDiff-FT's mask generator (``siamese.meddiff.maskgen``, ``python -m tools.maskgen``): a few real training steps
on CPU through the common trainer, then sampling: binary PNGs, manifest and statistics, determinism, batch
independence, the pair sampler taking the generated folder, one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_inference import cli, env  # noqa: F401  (fixtures)

from siamese.config import ConfigError, load_config
from siamese.meddiff.maskgen import mask_statistics, nearest_iou
from tools import inference
from tools.maskgen import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "maskgen_tiny.yaml"
TINY_OVERRIDES = ["data.synthetic_samples=8", "maskgen.resolution=32",
                  "maskgen.unet.model_channels=8", "maskgen.unet.channel_mult=[1,2]", "maskgen.unet.num_heads=2",
                  "maskgen.total_steps=3", "maskgen.batch_size=4", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("maskgen")
    out = root / "maskgen.safetensors"
    assert main(["train", "--config", str(CONFIG), f"train.output_dir={root / 'run'}", *TINY_OVERRIDES,
                 "--out", str(out)]) == 0
    assert (root / "run" / "maskgen" / "config.yaml").is_file()  # the common trainer's run folder
    return out


def sample(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--steps", "3", *extra])


def pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "masks").glob("*.png"))}


def test_sampled_folder(ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    assert sample(ckpt, out, "--n", "3", "--seed", "5") == 0
    assert sorted(pngs(out)) == ["gen_000000.png", "gen_000001.png", "gen_000002.png"]
    for path in sorted((out / "masks").glob("*.png")):
        mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32)
        assert set(np.unique(mask).tolist()) <= {0, 255}
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [x["name"] for x in lines] == ["gen_000000", "gen_000001", "gen_000002"]
    for line in lines:
        assert set(line) == {"name", "seed", "area", "components", "nearest_train_iou", "novelty"}
        assert 0.0 <= line["area"] <= 1.0 and 0.0 <= line["nearest_train_iou"] <= 1.0
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["generated"] == 3 and stats["training"] == 8 and stats["resolution"] == 32
    assert {"area", "components", "nearest_train_iou", "empty_generated", "near_copies"} <= set(stats)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed


def test_deterministic_and_batch_independent(ckpt: Path, tmp_path: Path) -> None:
    assert sample(ckpt, tmp_path / "a", "--n", "3", "--batch-size", "3") == 0
    assert sample(ckpt, tmp_path / "b", "--n", "3", "--batch-size", "1") == 0
    assert sample(ckpt, tmp_path / "c", "--n", "2", "--seed", "1") == 0
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert a == b
    assert (tmp_path / "a" / "manifest.jsonl").read_text() == (tmp_path / "b" / "manifest.jsonl").read_text()
    assert (tmp_path / "c" / "manifest.jsonl").read_text() != (tmp_path / "a" / "manifest.jsonl").read_text()


def test_pair_sampler_takes_generated_masks(ckpt: Path, env: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    gen = tmp_path / "gen"
    assert sample(ckpt, gen, "--n", "2") == 0
    pairs = tmp_path / "pairs"
    assert inference.main(cli(env, pairs, masks=gen / "masks")) == 0
    assert len(list((pairs / "masks").glob("*.png"))) == 4  # 2 masks × --n-per-mask 2


def test_errors_are_one_line(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    assert sample(tmp_path / "missing.safetensors", tmp_path / "x", "--n", "1") == 1
    (tmp_path / "exists").mkdir()
    assert sample(ckpt, tmp_path / "exists", "--n", "1") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "missing.safetensors" in errors[0] and "--force" in errors[1]
    assert sample(ckpt, tmp_path / "exists", "--n", "1", "--force") == 0


def test_statistics_by_hand() -> None:
    square = np.zeros((8, 8), np.uint8)
    square[2:6, 2:6] = 1
    two = np.zeros((8, 8), np.uint8)
    two[0:2, 0:2] = 1
    two[6:8, 6:8] = 1
    empty = np.zeros((8, 8), np.uint8)
    per_mask, summary = mask_statistics(np.stack([square, two, empty]), np.stack([square, two]))
    assert [m["components"] for m in per_mask] == [1, 2, 0]
    assert [m["area"] for m in per_mask] == [16 / 64, 8 / 64, 0.0]
    assert per_mask[0]["nearest_train_iou"] == 1.0 and per_mask[2]["nearest_train_iou"] == 0.0
    assert summary["empty_generated"] == 1 and summary["near_copies"] == 2
    assert nearest_iou(np.stack([empty]), np.stack([empty])).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"generated masks are not binary: values \[0, 1, 255\]"):
        mask_statistics(np.stack([square, square * 255]), np.stack([square]))


def test_config_rules() -> None:
    assert load_config(CONFIG).maskgen.resolution == 64
    with pytest.raises(ConfigError, match="maskgen.resolution"):
        load_config(CONFIG, ["maskgen.resolution=60"])
    with pytest.raises(ConfigError, match="maskgen.threshold"):
        load_config(CONFIG, ["maskgen.threshold=1.5"])
    with pytest.raises(ConfigError, match="maskgen.prediction 'x0' is not one of"):
        load_config(CONFIG, ["maskgen.prediction=x0"])


@pytest.mark.parametrize("prediction", ["v", "eps"])
def test_prediction_targets_convert_to_the_noise(prediction: str) -> None:
    """A network that predicts its target exactly gives the solvers the true ε (v: ε = √ᾱ v + √(1−ᾱ) x_t), and the
    module's loss is the MSE to that target."""
    import torch

    from siamese.meddiff import maskgen
    from siamese.meddiff.maskgen import MaskDDPMModule, build_denoiser, build_schedule, training_target

    cfg = load_config(CONFIG, TINY_OVERRIDES).maskgen
    schedule = build_schedule(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 2, (4, 1, 32, 32), generator=g).float() * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.q_sample(x0, t, noise)
    target = training_target(prediction, x0, noise, schedule.alphas_cumprod, t)
    if prediction == "v":
        a = schedule.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a * noise - (1 - a**2).sqrt() * x0)
    unet = build_denoiser(cfg)
    original = maskgen.network
    try:
        maskgen.network = lambda net, x, tt: target  # an oracle network in place of the UNet's output
        torch.testing.assert_close(maskgen.eps(unet, x_t, t, prediction, schedule.alphas_cumprod), noise,
                                   rtol=1e-4, atol=1e-4)
        module = MaskDDPMModule(unet, schedule, lr=1e-3, prediction=prediction)
        torch.manual_seed(0)
        loss = module.step_loss({"mask": x0}, 0).loss
        torch.manual_seed(0)
        t_drawn = torch.randint(0, schedule.num_timesteps, (4,))
        expected = (target - training_target(prediction, x0, torch.randn_like(x0), schedule.alphas_cumprod,
                                             t_drawn)).pow(2).mean()
        torch.testing.assert_close(loss, expected)
    finally:
        maskgen.network = original


def test_image_columns_and_loss() -> None:
    import torch

    from siamese.meddiff.maskgen import MaskDataset, MaskDDPMModule, build_denoiser, build_schedule

    cfg = load_config(CONFIG, TINY_OVERRIDES).maskgen
    torch.manual_seed(0)
    module = MaskDDPMModule(build_denoiser(cfg), build_schedule(cfg), lr=1e-3)
    masks = [np.zeros((32, 32), np.uint8), np.ones((32, 32), np.uint8)]
    batch = {"mask": torch.stack([MaskDataset(masks)[i]["mask"] for i in range(2)])}
    assert batch["mask"].min() == -1 and batch["mask"].max() == 1
    out = module.step_loss(batch, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.terms["loss_simple"].shape == (2,)
    assert all(p.grad is not None for p in module.unet.input_blocks.parameters())  # the encoder trains too
    columns = module.image_columns(batch, steps=2, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert [c.shape for c in columns] == [(2, 3, 32, 32)] * 2
    assert set(columns[1].unique().tolist()) <= {-1.0, 1.0}


def test_ema_weights_are_the_output(tmp_path: Path) -> None:
    """With train.ema.enabled the generator file holds the EMA weights (what DDPM samples from), not the last
    optimizer step's."""
    from ldm.checkpoint import load_state_dict

    import torch

    from tools.pretrain import consolidated_weights

    out = tmp_path / "ema.safetensors"
    run = tmp_path / "run"
    overrides = [f"train.output_dir={run}", *TINY_OVERRIDES, "train.ema.enabled=true", "train.ema.decay=0.5"]
    assert main(["train", "--config", str(CONFIG), *overrides, "--out", str(out)]) == 0
    saved = load_state_dict(out)
    ema = load_state_dict(run / "maskgen" / "ema_trainable.safetensors")
    assert set(saved) == {k[len("unet."):] for k in ema}
    assert all(np.array_equal(saved[k[len("unet."):]].numpy(), v.numpy()) for k, v in ema.items())
    cfg = load_config(CONFIG, overrides)
    from siamese.meddiff.maskgen import run_config

    last = consolidated_weights(run_config(cfg), "unet.", unsafe_pickle=False)
    assert any(not torch.equal(last[k].detach(), saved[k]) for k in saved)
