"""``tools.compare_generators`` on tiny generated data: two generators × two sampled folders (each from its own
"training run", whose cost.jsonl the comparison finds through the folder's provenance), every schedule with
segmenter seeds, filtered vs all, FID/KID with the test tower; the report's tables, verdict and plot; refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import pytest
from test_benchmark_schedules import filtered_copy, sampling_run

from siamese.config import ExperimentConfig
from siamese.data.synthetic import write_synthetic_dataset
from siamese.evaluation.compare import downstream, parse_named_folders, versus
from siamese.run_dir import record_cost, training_cost
from tools import compare_generators as compare_tool
from tools import split as split_tool

QUICK = ["--seg-steps", "12", "--resolution", "32", "--seg-batch", "4", "--no-progress"]


def _run_dir(path: Path, seconds: float) -> Path:
    """A training run directory as tools.train leaves it, as far as the comparison reads it."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("{}\n")
    record_cost(path, ExperimentConfig(), seconds, 0, 800)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    write_synthetic_dataset(root / "real", 20, 32, seed=0)
    assert split_tool.main([str(root / "real"), "--out", str(root / "split"), "--test-fraction", "0.2"]) == 0
    train = root / "split" / "train"
    folders = {}
    for method, what, seeds in (("siamese", "Siamese-Diffusion", (7, 8)), ("controlnet", "ControlNet", (9, 10))):
        for k, seed in enumerate(seeds):
            run = _run_dir(root / "runs" / f"{method}_s{k}", 360.0 + 36 * k)
            folders[method, k] = sampling_run(root / "synth" / f"{method}_s{k}" / "real", root / "real", seed, train,
                                              what=f"{what} run {run}")
    filtered = [filtered_copy(folders["siamese", k], root / "synth" / f"siamese_s{k}" / "filtered", keep=12)
                for k in range(2)]
    return root / "split", folders, filtered


def _gen(folders: dict, method: str) -> str:
    return f"{method}=" + ",".join(str(folders[method, k]) for k in range(2))


def test_training_cost_sums_the_recorded_segments(tmp_path):
    run = _run_dir(tmp_path / "run", 1800.0)
    record_cost(run, ExperimentConfig(), 1800.0, 800, 1600)
    cost = training_cost(run)
    assert cost["segments"] == 2 and cost["wall_seconds"] == 3600.0 and cost["steps"] == 1600
    assert cost["cpu_hours"] == 1.0 and cost["gpu_hours"] == 0.0 and cost["devices"] == ["1 × cpu"]
    assert training_cost(tmp_path) is None


def test_two_generators_compared_on_every_schedule(data, tmp_path, caplog):
    split, folders, filtered = data
    out = tmp_path / "cmp"
    caplog.set_level(logging.INFO)
    argv = ["--real", str(split), "--out", str(out), "--generator", _gen(folders, "siamese"),
            "--generator", _gen(folders, "controlnet"), "--filtered", "siamese=" + ",".join(map(str, filtered)),
            "--seeds", "2", "--synthetic-ratio", "0.5,1", "--features", "tiny", "--colour-rule", *QUICK]
    assert compare_tool.main(argv) == 0
    result = json.loads((out / "comparison.json").read_text())
    assert result["n_train"] == 16 and result["pretrain_phases"] == [6, 6]
    assert result["baseline"]["n"] == 2  # real only: trained once (2 segmenter seeds), every generator's baseline
    siamese, controlnet = result["generators"]["siamese"], result["generators"]["controlnet"]
    labels = [s["label"] for s in siamese["schedules"]]
    assert labels == ["real + synthetic ×0.5", "real + synthetic ×1", "synthetic only",
                      "pretrain-finetune (6 synthetic + 6 real steps)", "real + synthetic ×0.5 (filtered pairs)",
                      "real + synthetic ×1 (filtered pairs)", "synthetic only (filtered pairs)",
                      "pretrain-finetune (6 synthetic + 6 real steps) (filtered pairs)"]
    assert [s["label"] for s in controlnet["schedules"]] == labels[:4]
    for entry in siamese["schedules"] + controlnet["schedules"]:
        assert entry["n"] == 4 and entry["folders"] == 2 and entry["segmenter_seeds"] == 2  # 2 gen × 2 seg seeds
        assert entry["vs_real"] in ("beats", "lower", "no gain") and 0 <= entry["mean"] <= 1
    assert siamese["schedules"][0]["n_synthetic"] == [8]
    for g in (siamese, controlnet):
        assert g["fidelity"]["n"] == 2 and 0 <= g["fidelity"]["mean"] <= 1 and "fidelity_colour_rule" in g
        assert g["fid"]["n"] == 2 and g["kid"]["n"] == 2
        assert g["cost"]["per_training_wall_seconds"]["mean"] == pytest.approx(378.0)
        assert g["cost"]["total_cpu_hours"] == pytest.approx(756 / 3600, abs=1e-3)
    assert all(f["run"].endswith(f"siamese_s{k}") for k, f in enumerate(siamese["folders"]))
    report = (out / "comparison.md").read_text()
    assert "Best generator downstream: **" in report and "real + synthetic" in report
    assert ("**no gain**" in report or "**beats**" in report) and "filtered vs all pairs:" in report
    assert "| siamese | 2 |" in report and "CPU h per training" in report
    assert "| real only |" in report and "(g " in report and "s " in report
    assert cv2.imread(str(out / "comparison.png")) is not None
    # A re-run reuses every segmenter row; a changed schedule recomputes only its rows.
    caplog.clear()
    assert compare_tool.main(argv) == 0
    assert "(0 done)" not in caplog.text and caplog.text.count("runs (8 done)") == 2  # the filtered siamese folders
    caplog.clear()
    assert compare_tool.main([*argv, "--pretrain-share", "0.25"]) == 0
    assert "rows of" in caplog.text and "pretrain-finetune ×1 s0" in caplog.text


def test_the_verdict_says_no_gain_within_the_spread():
    base = {"mean": 0.70, "std": 0.02}
    assert versus({"mean": 0.71, "std": 0.02}, base) == "no gain"
    assert versus({"mean": 0.76, "std": 0.01}, base) == "beats"
    assert versus({"mean": 0.60, "std": 0.05}, base) == "lower"
    rows = [[{"arm": "synthetic", "pool": "all", "ratio": "1.0", "seed": s, "n_synthetic": "8", "mdice": d}
             for s, d in enumerate(values)] for values in ((0.5, 0.7), (0.6, 0.8))]
    entry = downstream(rows)[("synthetic", "all", 1.0)]
    assert entry["mean"] == pytest.approx(0.65) and entry["generator_seed_sd"] == pytest.approx(0.05)
    assert entry["segmenter_seed_sd"] == pytest.approx(0.1) and entry["n"] == 4


def test_bad_inputs_are_refused_in_one_line(data, tmp_path, caplog):
    split, folders, filtered = data
    base = ["--real", str(split), "--out", str(tmp_path / "x"), *QUICK]
    assert compare_tool.main([*base, "--generator", f"siamese={folders['siamese', 0]}"]) == 1
    assert "needs ≥ 2 sampling folders" in caplog.text
    assert compare_tool.main([*base, "--generator", _gen(folders, "siamese"), "--generator",
                              f"controlnet={folders['siamese', 0]},{folders['controlnet', 1]}"]) == 1
    assert "is given twice" in caplog.text
    assert compare_tool.main([*base, "--generator", _gen(folders, "siamese"), "--filtered",
                              f"siamese={filtered[0]}"]) == 1
    assert "1 folders for its 2 sampling folders" in caplog.text
    assert compare_tool.main([*base, "--generator", _gen(folders, "siamese"), "--filtered",
                              "controlnet=" + ",".join(map(str, filtered))]) == 1
    assert "which no --generator has" in caplog.text
    real = split.parent / "real"
    assert compare_tool.main(["--real", str(real), "--out", str(tmp_path / "y"), "--generator",
                              _gen(folders, "siamese"), *QUICK]) == 1
    assert "not a python -m tools.split output" in caplog.text
    assert compare_tool.main([*base, "--generator", "siamese"]) == 1 and "expected NAME=FOLDER" in caplog.text
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(ValueError, match="expected NAME"):
        parse_named_folders("=a,b", "--generator")
