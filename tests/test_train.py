"""Training CLI on the tiny config: real Lightning + real DeepSpeed ZeRO-2 on CPU, checkpoints, resume, 2 ranks.

The in-process runs share one gloo process group with tests/test_strategy.py (Lightning keeps it alive for the
pytest process); the 2-rank run is a subprocess of the real ``tutorial_train.py`` (Lightning re-launches argv).
"""

from __future__ import annotations

import csv
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

from ldm.checkpoint import load_state_dict

import pytest
import torch

from cldm.checkpoints import zero_checkpoint_to_state_dict
from cldm.convert import training_to_model_keys
from siamese.config import load_config
from siamese.data.synthetic import write_synthetic_dataset
from siamese.factory import build_model, load_weights, meta_model
from tools import inference as inference_tool
from tools import merge_control as merge_tool
from tools import train as train_tool
from tools import zero_to_fp32 as zero_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def _overrides(out: Path, steps: int = 4, **extra: object) -> list[str]:
    base = {"train.output_dir": str(out), "train.total_steps": steps, "train.checkpoint_every": 2,
            "train.keep_checkpoints": -1, "train.image_log_every": 2, "sample.steps": 2, "data.synthetic_samples": 8}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _metrics(out: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted((out / "logs").rglob("metrics.csv")):
        with path.open() as handle:
            rows += list(csv.DictReader(handle))
    return rows


@pytest.fixture(scope="module")
def trained(tmp_path_factory, init_ckpt):
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, _overrides(out, **{"train.ema.enabled": "true", "train.ema.decay": 0.5,
                                                "train.init_ckpt": init_ckpt}))
    trainer = train_tool.train(cfg)
    return out, cfg, trainer


def test_tiny_training_writes_zero2_checkpoints_config_and_images(trained):
    out, cfg, trainer = trained
    assert trainer.global_step == 4
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["step=2.ckpt", "step=4.ckpt"]
    # A real ZeRO checkpoint directory: model states + the (partitioned) optimizer state of rank 0.
    tag = (out / "checkpoints" / "step=4.ckpt" / "latest").read_text().strip()
    files = {p.name for p in (out / "checkpoints" / "step=4.ckpt" / tag).iterdir()}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files
    # The resolved config round-trips, sample.prompt (null) resolved to the training data's prompt.
    from siamese.config import with_data_prompt
    from siamese.data.layout import DEFAULT_PROMPT

    saved = load_config(out / "config.yaml")
    assert cfg.sample.prompt is None and saved.sample.prompt == DEFAULT_PROMPT
    assert saved == with_data_prompt(cfg, [DEFAULT_PROMPT])[0]
    assert sorted(p.name for p in (out / "images").glob("*.png")) == ["step_0000002.png", "step_0000004.png"]
    # EMA of the trainable weights: exported, and it lags the live weights (decay 0.5 over 4 steps).
    from ldm.checkpoint import load_state_dict

    ema = load_state_dict(out / "ema_trainable.safetensors")  # under the model's own (original) names
    live = dict(trainer.lightning_module.net.named_parameters())
    assert set(ema) == {n for n, p in live.items() if p.requires_grad}
    assert any(not torch.equal(v, live[n].detach()) for n, v in ema.items())


def test_checkpoint_holds_the_live_weights(trained):
    out, _, trainer = trained
    state = zero_checkpoint_to_state_dict(out / "checkpoints" / "step=4.ckpt")
    # ZeRO files hold parameters and buffers under their module names, frozen ones included.
    module = trainer.lightning_module
    live = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    assert set(dict(module.named_parameters())) <= set(state) <= set(live)  # non-persistent buffers aside
    for key, value in state.items():
        assert torch.equal(value, live[key].cpu()), key


def _zero_to_merged(ckpt: Path, init: Path, out: Path) -> dict[str, torch.Tensor]:
    """Steps 3 and 4 of the workflow through the real CLIs; returns the merged model's strict-loaded state."""
    assert zero_tool.main([str(ckpt), str(out / "trained.safetensors")]) == 0
    assert merge_tool.main(["--base", str(init), "--trained", str(out / "trained.safetensors"),
                            "--out", str(out / "merged.safetensors")]) == 0
    model = build_model(load_config(TINY).model)  # the config comes from the merged file's metadata
    load_weights(model, out / "merged.safetensors")  # strict
    return model.state_dict()


def test_zero_to_fp32_merge_round_trip_is_bit_exact(trained, init_ckpt, tmp_path, caplog):
    out, cfg, trainer = trained
    merged = _zero_to_merged(out / "checkpoints" / "step=4.ckpt", init_ckpt, tmp_path)
    live = trainer.lightning_module.net.state_dict()
    assert set(merged) == set(live)
    for key, value in live.items():
        assert torch.equal(merged[key], value.cpu()), key
    # Frozen weights came through training untouched: the merge replaced exactly the trained set.
    trainable = set(meta_model(cfg.model).configure_trainable(cfg.method.sd_locked))
    init = load_state_dict(init_ckpt)
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    assert changed and changed <= trainable
    assert "outside the trainable set" not in caplog.text
    # Step 5 on the merged file: its metadata carries the config, so no --config is needed.
    write_synthetic_dataset(tmp_path / "data", 2, 64)
    assert inference_tool.main(["--ckpt", str(tmp_path / "merged.safetensors"), "--masks",
                                str(tmp_path / "data" / "masks"), "--out", str(tmp_path / "synth"), "--steps", "2",
                                "--no-progress"]) == 0
    assert len(list((tmp_path / "synth" / "images").glob("*.png"))) == 2


def test_bf16_training_round_trip_keeps_the_exact_frozen_weights(init_ckpt, tmp_path, caplog):
    """DeepSpeed's bf16 mode holds the whole model in bf16: training and image logging must run, and the merge must
    restore the frozen weights' exact fp32 values from the base (the ZeRO files hold them rounded)."""
    out = tmp_path / "run"
    cfg = load_config(TINY, _overrides(out, steps=2, **{"train.precision": "bf16-mixed",
                                                        "train.init_ckpt": init_ckpt}))
    train_tool.train(cfg)
    assert (out / "images" / "step_0000002.png").is_file()
    caplog.set_level(logging.INFO)
    assert zero_tool.main([str(out), str(tmp_path / "t.safetensors")]) == 0
    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(tmp_path / "t.safetensors"),
                            "--out", str(tmp_path / "m.safetensors")]) == 0
    init, merged = load_state_dict(init_ckpt), load_state_dict(tmp_path / "m.safetensors")
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    # Every frozen weight is the base's exact value; (after 2 steps, not every trainable tensor has moved yet).
    assert changed and changed <= set(meta_model(cfg.model).configure_trainable(cfg.method.sd_locked))
    assert "rounded" in caplog.text and "outside the trainable set" not in caplog.text


def test_zero_to_fp32_refuses_foreign_pickles(trained, tmp_path, caplog):
    import shutil

    out, _, _ = trained
    ckpt = tmp_path / "step=4.ckpt"
    shutil.copytree(out / "checkpoints" / "step=4.ckpt", ckpt)
    states = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    obj = torch.load(states, weights_only=False)  # our own file, written by the fixture above
    obj["client_note"] = _Payload()
    torch.save(obj, states)
    from cldm.checkpoints import write_marker

    write_marker(ckpt, 1)  # a tamperer can re-mark it complete: the pickle check still refuses it
    target = tmp_path / "t.safetensors"
    assert zero_tool.main([str(ckpt), str(target)]) == 1
    assert "posixpath.join" in caplog.text and "--unsafe-pickle" in caplog.text and not target.exists()
    assert zero_tool.main([str(ckpt), str(target), "--unsafe-pickle", "--config", str(out / "config.yaml")]) == 0
    assert zero_tool.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "x.safetensors")]) == 1
    assert zero_tool.main([str(tmp_path), str(tmp_path / "x.safetensors")]) == 1  # no checkpoint in there
    assert zero_tool.main([str(ckpt), str(target)]) == 1  # exists, no --force
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "x.safetensors").exists()


def test_zero_to_fp32_reads_single_file_lightning_checkpoints(trained, tmp_path):
    """Strategy ddp/auto writes one .ckpt file: the LightningModule state nested in it, plus numpy RNG state."""
    import numpy as np

    out, _, trainer = trained
    module_state = trainer.lightning_module.state_dict()
    torch.save({"state_dict": module_state, "global_step": 4, "rng": np.random.get_state()}, tmp_path / "s.ckpt")
    target = tmp_path / "t.safetensors"
    assert zero_tool.main([str(tmp_path / "s.ckpt"), str(target), "--config", str(out / "config.yaml")]) == 0
    converted = load_state_dict(target)
    expected = training_to_model_keys(module_state)
    assert set(converted) == set(expected) and all(torch.equal(converted[k], v) for k, v in expected.items())


class _Payload:
    def __reduce__(self):
        return (os.path.join, ("a", "b"))


def test_logged_terms_follow_the_configured_schedule(trained):
    out, cfg, _ = trained
    rows = [r for r in _metrics(out) if r.get("train/image_weight")]
    assert rows, "per-term losses were not logged"
    for row in rows:
        step = int(row["step"])
        assert float(row["train/image_weight"]) == pytest.approx(step / cfg.train.total_steps)
        for term in ("loss_mask", "loss_image", "loss_consistency", "loss_aug"):
            assert f"train/{term}" in row
    # L_aug's step gate opens after a third of the run.
    gates = {int(r["step"]): float(r["train/aug_active"]) for r in rows}
    assert all(v == float(s > cfg.train.total_steps / 3) for s, v in gates.items())


def test_resume_latest_continues_step_count_and_schedule(trained, tmp_path):
    out, cfg, _ = trained
    # Fresh copy of the run directory with only the step-2 checkpoint, then resume to step 4.
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step=4.ckpt")
    shutil.rmtree(run / "logs")
    cfg2 = load_config(TINY, _overrides(run))
    assert train_tool.find_latest_checkpoint(run / "checkpoints").name == "step=2.ckpt"
    trainer = train_tool.train(cfg2, resume="latest")
    assert trainer.global_step == 4
    steps = sorted({int(r["step"]) for r in _metrics(run) if r.get("train/image_weight")})
    assert steps and min(steps) >= 2  # nothing before the checkpoint was re-run
    for row in (r for r in _metrics(run) if r.get("train/image_weight")):
        assert float(row["train/image_weight"]) == pytest.approx(int(row["step"]) / 4)
    # Resumed mid-epoch (4 batches per epoch): same batches, noise and optimizer state as the uninterrupted run,
    # so the same weights, bit for bit.
    resumed, uninterrupted = trainer.lightning_module.net.state_dict(), trained[2].lightning_module.net.state_dict()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_step_sampler_order_is_a_function_of_the_step():
    from cldm.data_order import StepSampler

    step = 0
    sampler = StepSampler(10, 3, seed=1, step_source=lambda: step)
    assert len(sampler) == 9 and sampler.batches_per_epoch() == 3  # the remainder of each epoch is dropped
    epoch0 = list(sampler)
    assert len(set(epoch0)) == 9
    step = 2  # resumed after two batches: the third batch of the same permutation
    assert list(sampler) == epoch0[6:]
    step = 3
    epoch1 = list(sampler)
    assert sorted(epoch1) != epoch1 and epoch1 != epoch0  # a new permutation each epoch
    step = 0
    shards = [sampler.epoch_indices(0, rank, 2) for rank in range(2)]  # 2 ranks: disjoint equal shares
    assert len(shards[0]) == len(shards[1]) == 3 and not set(shards[0]) & set(shards[1])


def test_cli_help_dry_run_and_bad_config(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        train_tool.main(["--help"])
    assert exc.value.code == 0
    assert train_tool.main(["--config", str(TINY), "--dry-run", "train.lr=0.5"]) == 0
    assert "lr: 0.5" in capsys.readouterr().out
    assert train_tool.main(["--config", str(TINY), "--dry-run", "train.lrr=1"]) == 2
    assert train_tool.main(["--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    assert train_tool.main(["--config", str(TINY), "--resume", str(tmp_path / "nope.ckpt"),
                            f"train.output_dir={tmp_path}"]) == 2
    assert not (tmp_path / "config.yaml").exists()


def test_dry_run_checks_the_paths_a_run_needs(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert train_tool.main(["--config", str(TINY), "--dry-run", f"data.root={tmp_path / 'nowhere'}"]) == 1
    assert f"data.root not found: {tmp_path / 'nowhere'}" in caplog.text
    assert train_tool.main(["--config", str(TINY), "--dry-run", f"data.root={tmp_path}"]) == 1
    assert "has no prompt.json" in caplog.text
    write_synthetic_dataset(tmp_path / "data", 2, 16)
    assert train_tool.main(["--config", str(TINY), "--dry-run", f"data.root={tmp_path / 'data'}",
                            f"train.init_ckpt={tmp_path / 'init.safetensors'}"]) == 1
    assert "train.init_ckpt not found" in caplog.text
    assert train_tool.main(["--config", str(TINY), "--dry-run", f"data.root={tmp_path / 'data'}"]) == 0


def test_a_pair_that_cannot_line_up_fails_before_the_first_step(tmp_path, caplog):
    import cv2
    import numpy as np

    write_synthetic_dataset(tmp_path / "data", 4, 16)
    cv2.imwrite(str(tmp_path / "data" / "masks" / "synthetic_000002.png"), np.zeros((16, 24), np.uint8))
    caplog.set_level(logging.ERROR)
    out = tmp_path / "run"
    assert train_tool.main(["--config", str(TINY), f"data.root={tmp_path / 'data'}", f"train.output_dir={out}",
                            "train.total_steps=1"]) == 1
    assert "1 of 4 pairs cannot line up" in caplog.text and "synthetic_000002" in caplog.text
    assert not (out / "checkpoints").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_zero2_via_cli(tmp_path, init_ckpt):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["MASTER_PORT"] = str(_free_port())
    cmd = [sys.executable, str(REPO / "tutorial_train.py"), "--config", str(TINY),
           *_overrides(tmp_path, steps=2, **{"train.devices": 2, "train.image_log_every": 0,
                                             "train.init_ckpt": init_ckpt})]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "step=2.ckpt"
    tag = (ckpt / "latest").read_text().strip()
    shards = sorted(p.name for p in (ckpt / tag).glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    # Both optimizer shards consolidated, merged, loaded strictly: equal to the live weights rank 0 saved.
    merged = _zero_to_merged(ckpt, init_ckpt, tmp_path)
    module = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]  # our own file
    live = training_to_model_keys(module)
    assert set(merged) == set(live)
    for key, value in live.items():
        assert torch.equal(merged[key], value), key


def test_progress_bar_counts_optimizer_steps_of_the_run(trained):
    from cldm.callbacks import StepProgressBar

    _, cfg, trainer = trained
    (bar,) = [c for c in trainer.callbacks if isinstance(c, StepProgressBar)]
    # Under pytest stderr is no terminal: log lines (every max_steps / 20 steps and the last), no carriage returns.
    assert bar._plain is not None and (bar._plain["last"], bar._plain["total"]) == (4, cfg.train.total_steps)
    assert bar._plain["every"] == max(1, cfg.train.total_steps // 20)


def test_latest_checkpoint_prefers_the_highest_step_then_the_newest(tmp_path):
    import time

    from cldm.checkpoints import write_marker

    for name in ("step=6.ckpt", "step=12.ckpt", "step=12-v1.ckpt"):
        (tmp_path / name).mkdir()
        write_marker(tmp_path / name, world_size=1)  # complete (no files)
        time.sleep(0.01)  # distinct modification times, oldest first
    assert train_tool.find_latest_checkpoint(tmp_path).name == "step=12-v1.ckpt"
    assert train_tool.find_latest_checkpoint(tmp_path / "missing") is None


def test_the_last_step_is_always_checkpointed(tmp_path):
    cfg = load_config(TINY, _overrides(tmp_path, steps=3, **{"train.image_log_every": 0}))  # every 2 steps
    train_tool.train(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["step=2.ckpt", "step=3.ckpt"]
    assert train_tool.find_latest_checkpoint(tmp_path / "checkpoints").name == "step=3.ckpt"
    assert train_tool.train(cfg, resume="latest").global_step == 3  # a finished run resumes as finished


def test_validation_during_training_logs_mask_fidelity_to_csv_and_tensorboard(tmp_path):
    cfg = load_config(TINY, _overrides(tmp_path, steps=2, **{"train.val_every": 1, "train.val_samples": 2,
                                                             "train.logger": "both", "train.image_log_every": 0}))
    train_tool.train(cfg)
    rows = [r for r in _metrics(tmp_path) if r.get("val/mask_dice")]
    assert [int(r["step"]) for r in rows] == [1, 2]  # logged at the steps it ran, on the fixed held-out masks
    assert all(0.0 <= float(r["val/mask_dice"]) <= 1.0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "images").glob("val_step_*.png")) == ["val_step_0000001.png",
                                                                                    "val_step_0000002.png"]
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))  # TensorBoard beside the CSV
