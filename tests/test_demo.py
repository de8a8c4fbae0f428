"""The main job (``python -m tools.demo``) on a minimal budget: every stage through the real tools, the report and
the grid, skipping finished stages on a re-run, ``--force``, and its refusals. The full-budget run (the README's
figures) is the demo itself; here only the wiring and the outputs are checked."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import pytest

from tools import demo
from tools.demo_report import CELL

QUICK = ["--train-pairs", "10", "--steps", "2", "--batch-size", "2", "--pairs", "2", "--sample-steps", "2",
         "--seg-steps", "3"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo.main(["--out", str(out), *QUICK]) == 0
    return out


def test_demo_runs_every_stage_and_writes_the_report(demo_out):
    result = json.loads((demo_out / "report.json").read_text())
    assert set(result["fidelity"]) == {"siamese", "controlnet", "untrained"}
    for by_mode in result["fidelity"].values():
        assert set(by_mode) == {"real", "random"}
        assert all(s["n"] == 2 and 0.0 <= s["mean"] <= 1.0 for s in by_mode.values())
    report = (demo_out / "report.md").read_text()
    assert "| siamese | real | 2 |" in report and "What this shows and what it cannot" in report
    grid = cv2.imread(str(demo_out / "grid.png"))
    assert grid is not None and grid.shape[1] == 5 * CELL  # mask | Siamese | overlay | baseline | untrained
    # Each stage went through the real command-line tools, in workflow order.
    commands = (demo_out / "commands.sh").read_text().splitlines()
    tools_run = [line.split()[1] if line.startswith("python ") else line.split()[0] for line in commands]
    assert tools_run[:5] == ["-m", "-m", "cp", "tool_add_control.py", "tutorial_train.py"]
    assert "tools.split" in commands[1] and "split/train" in commands[4]  # split first, trained on its train side
    assert tools_run.count("tutorial_train.py") == 2 and tools_run.count("tutorial_inference.py") == 6
    assert tools_run[-1] == "-m" and "tools.evaluate" in commands[-1]
    assert "The evaluation tools on these pairs" in report and (demo_out / "eval" / "report.md").is_file()
    assert (demo_out / "runs" / "siamese" / "checkpoints" / "step=2.ckpt" / "latest").is_file()
    assert (demo_out / "models" / "siamese.safetensors").is_file()
    assert len(list((demo_out / "synth" / "siamese" / "random" / "masks").glob("*.png"))) == 2


def test_rerun_skips_finished_stages(demo_out, caplog):
    caplog.set_level(logging.INFO)
    before = (demo_out / "models" / "siamese.safetensors").stat().st_mtime_ns
    assert demo.main(["--out", str(demo_out), *QUICK]) == 0
    result = json.loads((demo_out / "report.json").read_text())
    assert "train siamese" in result["skipped_stages"] and "sample untrained random" in result["skipped_stages"]
    assert result["stage_seconds"] == {}
    assert (demo_out / "models" / "siamese.safetensors").stat().st_mtime_ns == before


def test_a_rerun_with_other_sampling_settings_recomputes_the_sampling_not_the_training(demo_out, caplog):
    caplog.set_level(logging.INFO)
    model = (demo_out / "models" / "siamese.safetensors").stat().st_mtime_ns
    sample = (demo_out / "synth" / "siamese" / "real" / "manifest.jsonl").read_text()
    assert demo.main(["--out", str(demo_out), *QUICK, "--cfg", "2.0"]) == 0
    result = json.loads((demo_out / "report.json").read_text())
    assert {"train siamese", "export siamese", "data", "split"} <= set(result["skipped_stages"])
    assert "sample siamese real" in result["stage_seconds"] and "evaluate" in result["stage_seconds"]
    assert (demo_out / "models" / "siamese.safetensors").stat().st_mtime_ns == model
    new = (demo_out / "synth" / "siamese" / "real" / "manifest.jsonl").read_text()
    assert new != sample and '"cfg": 2.0' in new and result["settings"]["cfg"] == 2.0
    # The evaluation scored on the split's test side, after the provenance check accepted the clean pairs.
    evaluation = json.loads((demo_out / "eval" / "report.json").read_text())
    assert evaluation["split"] == {"origin": evaluation["split"]["origin"], "train": 8, "test": 2}
    assert not any(w.startswith("ACCEPTED LEAK") for w in evaluation["leak_check"]["warnings"])


def test_force_redoes_and_pretrain_makes_the_base(tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), *QUICK, "--no-baseline", "--pretrain", "--pretrain-steps", "2"]
    assert demo.main(args) == 0
    result = json.loads((out / "report.json").read_text())
    assert set(result["fidelity"]) == {"siamese", "untrained"}
    assert (out / "pretrain" / "unet" / "checkpoints" / "step=2.ckpt").is_dir()
    assert "python -m tools.pretrain" in (out / "commands.sh").read_text()
    assert demo.main([*args, "--force"]) == 0
    assert "base" in json.loads((out / "report.json").read_text())["stage_seconds"]


def test_refuses_a_foreign_folder_and_a_damaged_base(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.ERROR)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    assert demo.main(["--out", str(foreign), *QUICK]) == 2
    assert "not made by the demo" in caplog.text and (foreign / "thesis.tex").read_text() == "keep me"
    monkeypatch.setattr(demo, "SHIPPED_BASE_SHA256", "0" * 64)
    assert demo.main(["--out", str(tmp_path / "new"), *QUICK]) == 1
    assert "damaged or replaced" in caplog.text


def test_shipped_base_matches_its_recorded_sha256():
    from ldm.fileio import file_sha256

    assert file_sha256(demo.SHIPPED_BASE) == demo.SHIPPED_BASE_SHA256
    readme = (Path(demo.SHIPPED_BASE).parent / "README.md").read_text()
    assert demo.SHIPPED_BASE_SHA256 in readme
