"""What can lose a user's work: resuming a tampered checkpoint, resuming on another number of ranks, a crash while a
checkpoint is written, a second run into a used directory, changed settings on resume. Real training runs (tiny
config, DeepSpeed ZeRO-2 on CPU; the 2-rank side as a subprocess of the real ``tutorial_train.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cldm.checkpoints import find_latest_checkpoint, incomplete_reason, write_marker
from siamese.config import load_config
from tools import train as train_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
MARKER_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "siamese_tamper_marker"


def _args(out: Path, steps: int, **extra: object) -> list[str]:
    base = {"train.output_dir": out, "train.total_steps": steps, "train.checkpoint_every": 2,
            "train.keep_checkpoints": -1, "train.image_log_every": 0, "data.synthetic_samples": 8,
            "train.batch_size": 2, "train.log_every": 1}
    base.update(extra)
    return ["--config", str(TINY), *[f"{k}={v}" for k, v in base.items()]]


def _cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """tutorial_train.py in a fresh process (needed for 2 ranks: Lightning re-launches argv)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    return subprocess.run([sys.executable, str(REPO / "tutorial_train.py"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _optimizer_state(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Full per-parameter fp32 weights and AdamW moments of a ZeRO-2 checkpoint, merged from its rank shards
    independently of DeepSpeed's converters: each rank holds a contiguous slice of one flat buffer per parameter
    group, parameters laid out in ``param_shapes`` order."""
    tag = ckpt / (ckpt / "latest").read_text().strip()
    model = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False, map_location="cpu")  # our own file
    shards = sorted(tag.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                    key=lambda p: int(p.name.split("_")[3]))
    states = [torch.load(p, weights_only=False, map_location="cpu")["optimizer_state_dict"] for p in shards]
    out: dict[str, dict[str, torch.Tensor]] = {}
    for group, shapes in enumerate(model["param_shapes"]):
        flat = {"fp32": torch.cat([s["single_partition_of_fp32_groups"][group] for s in states])}
        for key in ("exp_avg", "exp_avg_sq"):
            flat[key] = torch.cat([s["base_optimizer_state"]["state"][group][key] for s in states])
        offset = 0
        for name, shape in shapes.items():
            n = int(torch.Size(shape).numel())
            out[name] = {k: v[offset:offset + n].view(shape).clone() for k, v in flat.items()}
            offset += n
    return out


# -- 1. a tampered checkpoint is never unpickled ---------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER_FILE}",))


def test_resume_refuses_a_tampered_checkpoint_before_loading_anything(tmp_path, caplog):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 2)) == 0
    states = run / "checkpoints" / "step=2.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt"
    obj = torch.load(states, weights_only=False)  # our own file, written a moment ago
    obj["innocent_looking_entry"] = _Payload()
    torch.save(obj, states)
    write_marker(states.parent.parent, 1)  # even a "complete" checkpoint is vetted
    MARKER_FILE.unlink(missing_ok=True)
    before = _tree_digest(run)
    caplog.set_level(logging.ERROR)
    code = train_tool.main(["--resume", str(run), "train.total_steps=4"])
    assert code != 0 and not MARKER_FILE.exists()
    assert "would import posix.system" in caplog.text and "--unsafe-pickle" in caplog.text
    assert _tree_digest(run) == before  # nothing written: no config, no history line, no checkpoint


# -- 2. another number of ranks ---------------------------------------------------------------------------------------
def _restored(run: Path, devices: int, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Resume ``run`` on ``devices`` ranks (no step taken) and read back the restored optimizer state."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        env["MASTER_PORT"] = str(s.getsockname()[1])
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "_resume_worker.py"), str(run), str(devices),
                           str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flat = load_file(out)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        name, _, kind = key.rpartition("/")
        state.setdefault(name, {})[kind] = value
    return state


def _assert_same_state(restored: dict, source: dict) -> None:
    assert set(restored) == set(source)
    for name in source:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(restored[name][key], source[name][key]), (name, key)


def test_resume_on_fewer_and_more_ranks_repartitions_the_optimizer_state_exactly(tmp_path):
    """2 → 1 and 1 → 2 ranks: right after the restore, every trainable parameter's fp32 master weight and AdamW
    moments equal the source checkpoint's (merged from its shards independently of DeepSpeed), bit for bit; then
    training continues on the new number of ranks."""
    two = tmp_path / "two"
    proc = _cli(_args(two, 2, **{"train.devices": 2}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = _optimizer_state(two / "checkpoints" / "step=2.ckpt")
    _assert_same_state(_restored(two, 1, tmp_path / "on_one.safetensors"), source)
    assert not (two / ".universal").exists()  # the conversion is removed once the resumed run ends

    one = tmp_path / "one"
    assert train_tool.main(_args(one, 2)) == 0
    source = _optimizer_state(one / "checkpoints" / "step=2.ckpt")
    _assert_same_state(_restored(one, 2, tmp_path / "on_two.safetensors"), source)

    proc = _cli(["--resume", str(one), "train.devices=2", "train.total_steps=4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    newest = find_latest_checkpoint(one / "checkpoints")
    assert newest.name == "step=4.ckpt"
    assert len(list((newest / "checkpoint").glob("*optim_states.pt"))) == 2
    history = [json.loads(line)["changed"] for line in (one / "config_history.jsonl").read_text().splitlines()]
    # The restore-only resumes trained nothing and recorded nothing; the fresh start and the continuation did.
    assert history == [{}, {"train.devices": [1, 2], "train.total_steps": [2, 4]}]


# -- 3. a crash while saving costs at most one interval ---------------------------------------------------------------
def test_a_crash_while_saving_leaves_no_checkpoint_and_keeps_the_previous(tmp_path, monkeypatch, caplog):
    from pytorch_lightning.strategies import DeepSpeedStrategy

    run = tmp_path / "run"
    assert train_tool.main(_args(run, 2, **{"train.keep_checkpoints": 1})) == 0
    original = DeepSpeedStrategy.save_checkpoint

    def dies_half_way(self, checkpoint, filepath, storage_options=None):
        original(self, checkpoint, filepath, storage_options)
        shard = next(Path(filepath).rglob("*optim_states.pt"))
        shard.write_bytes(shard.read_bytes()[:100])  # the job dies while this file is written
        raise RuntimeError("killed while saving")

    monkeypatch.setattr(DeepSpeedStrategy, "save_checkpoint", dies_half_way)
    with pytest.raises(RuntimeError, match="killed while saving"):
        train_tool.train(load_config(run / "config.yaml", ["train.total_steps=4"]), resume="latest")
    monkeypatch.undo()
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step=2.ckpt", "step=4.ckpt.partial"]  # retention deleted nothing; no half step=4.ckpt
    assert incomplete_reason(run / "checkpoints" / "step=2.ckpt") is None
    assert train_tool.main(["--resume", str(run), "train.total_steps=4"]) == 0  # continues from step 2
    # The partial directory was replaced by the complete step 4; Lightning never deletes the checkpoint a run
    # resumed from, so step 2 stays beyond keep_checkpoints=1.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=2.ckpt", "step=4.ckpt"]
    assert incomplete_reason(run / "checkpoints" / "step=4.ckpt") is None


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "latest", "complete.json"])
def test_resume_latest_skips_a_truncated_checkpoint(tmp_path, caplog, victim):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 4)) == 0
    newest = run / "checkpoints" / "step=4.ckpt"
    path = next(newest.rglob(victim))
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)] if victim != "complete.json" else b"{")
    caplog.set_level(logging.WARNING)
    assert find_latest_checkpoint(run / "checkpoints").name == "step=2.ckpt"
    assert f"skipping incomplete checkpoint {newest}" in caplog.text
    assert train_tool.main(["--resume", str(run)]) == 0


# -- 4. one run per directory; resume uses the run's own config --------------------------------------------------------
def test_a_second_run_into_a_used_directory_is_refused(tmp_path, caplog):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 4)) == 0
    config = (run / "config.yaml").read_text()
    caplog.set_level(logging.ERROR)
    assert train_tool.main(_args(run, 2)) == 2
    assert "already holds a run (config.yaml, 2 checkpoint(s), newest step=4.ckpt)" in caplog.text
    assert "--resume latest" in caplog.text and "--force" in caplog.text
    assert (run / "config.yaml").read_text() == config
    (run / "notes.txt").write_text("mine")
    assert train_tool.main([*_args(run, 2), "--force"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step=2.ckpt"]
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files were removed
    assert load_config(run / "config.yaml").train.total_steps == 2


def test_resume_uses_the_runs_config_and_refuses_changes_that_cannot_take_effect(tmp_path, caplog):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 2, **{"train.lr": 3e-4})) == 0
    caplog.set_level(logging.INFO)
    # No --config, no repeated overrides: the run's own config.yaml.
    assert train_tool.main(["--resume", str(run), "train.lr=1e-3"]) == 2
    assert "train.lr is 0.0003 in" in caplog.text and "but 0.001 now: it cannot change on resume" in caplog.text
    assert train_tool.main(["--resume", str(run), "train.total_steps=4", "train.log_every=2"]) == 0
    cfg = load_config(run / "config.yaml")
    assert (cfg.train.total_steps, cfg.train.lr, cfg.train.log_every) == (4, 3e-4, 2)
    last = json.loads((run / "config_history.jsonl").read_text().splitlines()[-1])
    assert last["from_step"] == 2 and last["changed"] == {"train.log_every": [1, 2], "train.total_steps": [2, 4]}
    # --resume latest: the config (and overrides) only name the run directory; what they repeat is unchanged.
    assert train_tool.main([*_args(run, 6), "--resume", "latest"]) == 0
    assert find_latest_checkpoint(run / "checkpoints").name == "step=6.ckpt"


# -- 5. retention ------------------------------------------------------------------------------------------------------
def test_retention_keeps_the_newest_also_after_resuming_from_an_older_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 6, **{"train.keep_checkpoints": 2})) == 0
    names = lambda: sorted(p.name for p in (run / "checkpoints").iterdir())  # noqa: E731
    assert names() == ["step=4.ckpt", "step=6.ckpt"]  # step 2 deleted once step 6 was complete
    # Resuming from step 4 writes its step 6 beside the first one (-v1): the abandoned timeline's step 6 is kept
    # (never deleted silently), the newest complete checkpoint is the new one, and --resume latest takes it.
    assert train_tool.main(["--resume", str(run / "checkpoints" / "step=4.ckpt")]) == 0
    assert names() == ["step=4.ckpt", "step=6-v1.ckpt", "step=6.ckpt"]
    assert find_latest_checkpoint(run / "checkpoints").name == "step=6-v1.ckpt"
    assert train_tool.main(["--resume", str(run), "train.total_steps=10"]) == 0
    # The new timeline keeps its 2 newest; the checkpoint a run resumed from is never deleted (Lightning's rule).
    assert names() == ["step=10.ckpt", "step=6-v1.ckpt", "step=6.ckpt", "step=8.ckpt"]
    assert all(incomplete_reason(run / "checkpoints" / n) is None for n in names())


def test_the_plain_controlnet_method_trains(tmp_path):
    run = tmp_path / "run"
    args = _args(run, 2)
    args[1] = str(REPO / "configs" / "controlnet_tiny.yaml")
    assert train_tool.main(args) == 0
    rows = (next((run / "logs").rglob("metrics.csv"))).read_text().splitlines()
    header = rows[0].split(",")
    assert "train/loss_mask" in header and "train/loss_image" not in header and "train/loss_consistency" not in header
    assert find_latest_checkpoint(run / "checkpoints").name == "step=2.ckpt"


def test_every_resume_failure_is_one_line_and_leaves_the_run_as_it_was(tmp_path, caplog):
    run = tmp_path / "run"
    assert train_tool.main(_args(run, 2)) == 0
    caplog.set_level(logging.ERROR)
    assert train_tool.main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in caplog.text
    assert train_tool.main(["--resume", str(tmp_path)]) == 2  # a folder that is no run
    # A config edited since (another geometry): refused before anything is written.
    text = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(text.replace("model_channels: 32", "model_channels: 64"))
    before = _tree_digest(run)
    assert train_tool.main(["--resume", str(run), "train.total_steps=4"]) == 2
    assert "does not fit the model of" in caplog.text
    assert _tree_digest(run) == before


def test_a_pickled_init_checkpoint_with_code_is_refused(tmp_path, caplog, init_ckpt):
    from ldm.checkpoint import load_state_dict

    evil = tmp_path / "init.ckpt"
    torch.save({"state_dict": dict(load_state_dict(init_ckpt)), "note": _Payload()}, evil)
    MARKER_FILE.unlink(missing_ok=True)
    caplog.set_level(logging.ERROR)
    assert train_tool.main(_args(tmp_path / "run", 2, **{"train.init_ckpt": evil})) == 1
    assert not MARKER_FILE.exists() and "--unsafe-pickle" in caplog.text
