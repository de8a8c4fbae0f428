"""The evaluation tools end to end on tiny generated data: explicit splits that leak nothing, the downstream
benchmark (resumable, refusing other settings), mask fidelity with the real-data segmenter, and ``tools.evaluate``'s
one report — plus their one-line refusals."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import pytest

from siamese.data.masks import mask_to_png
from siamese.data.synthetic import synthetic_pair, write_synthetic_dataset
from siamese.evaluation.splits import Pair, check_no_leak, load_or_make_split, make_split, real_pairs
from tools import evaluate as evaluate_tool
from tools import segmentation_benchmark as bench_tool

QUICK = ["--seg-steps", "15", "--resolution", "32", "--seg-batch", "4", "--no-progress"]


def _sampling_run(folder: Path, real_root: Path, seed: int) -> Path:
    """A sampling output folder as tutorial_inference.py writes it: images/, masks/, manifest.jsonl with sources."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    lines = []
    for pair in real_pairs(real_root):
        rgb, mask = synthetic_pair(int(pair.name.split("_")[-1]), 32, seed)
        name = f"{pair.name}_k0"
        cv2.imwrite(str(folder / "images" / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask_to_png(mask))
        lines.append(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "source": str(pair.mask), "k": 0}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_synthetic_dataset(root / "real", 20, 32, seed=0)
    return root / "real", _sampling_run(root / "synth", root / "real", seed=7)


def test_split_is_seeded_grouped_reused_and_tied_to_its_dataset(data, tmp_path):
    pairs = real_pairs(data[0])
    split = make_split(pairs, test_fraction=0.25, seed=3)
    assert len(split["test"]) == 5 and not set(split["test"]) & set(split["train"])
    assert make_split(pairs, test_fraction=0.25, seed=3) == split != make_split(pairs, test_fraction=0.25, seed=4)
    # Patient level: names synthetic_0000NN → the patient is the tens digit; a patient never straddles the split.
    grouped = make_split(pairs, test_fraction=0.3, seed=0, group_regex=r"_0000(\d)")
    assert {n[-2] for n in grouped["test"]}.isdisjoint({n[-2] for n in grouped["train"]})
    assert load_or_make_split(tmp_path, pairs, test_fraction=0.25, seed=3) == split
    assert load_or_make_split(tmp_path, pairs, test_fraction=0.5, seed=9) == split  # written once, reused
    with pytest.raises(ValueError, match="belongs to another dataset"):
        load_or_make_split(tmp_path, pairs[:-1], test_fraction=0.25, seed=3)


def test_leaks_are_found_not_assumed(data, tmp_path):
    pairs = real_pairs(data[0])
    train, test = pairs[:15], pairs[15:]
    check_no_leak(train, test)
    with pytest.raises(ValueError, match="a file of the test split"):
        check_no_leak([*train, test[0]], test)
    copy = tmp_path / "copy.png"
    copy.write_bytes(test[1].image.read_bytes())  # same content under another name
    with pytest.raises(ValueError, match="identical to test image"):
        check_no_leak([*train, Pair("renamed", copy, train[0].mask)], test)
    with pytest.raises(ValueError, match="a file of the test split"):  # conditioned on a test mask file
        check_no_leak([*train, Pair("synth", train[0].image, train[0].mask, source=test[2].mask)], test)
    mask_copy = tmp_path / "mask_copy.png"
    mask_copy.write_bytes(test[2].mask.read_bytes())  # ... or on a copy of one
    with pytest.raises(ValueError, match="generated from the mask of test pair"):
        check_no_leak([*train, Pair("synth", train[0].image, train[0].mask, source=mask_copy)], test)


def test_benchmark_runs_every_arm_and_seed_and_resumes(data, tmp_path, caplog):
    real, synth = data
    out = tmp_path / "bench"
    args = ["--real", str(real), "--synthetic", str(synth), "--out", str(out), "--seeds", "2",
            "--synthetic-ratio", "0.5,1", *QUICK]
    caplog.set_level(logging.INFO)
    assert bench_tool.main(args) == 0
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["arm"], float(r["ratio"]), int(r["seed"])) for r in rows] == [
        ("real", 0.0, 0), ("real", 0.0, 1), ("real+synthetic", 0.5, 0), ("real+synthetic", 0.5, 1),
        ("real+synthetic", 1.0, 0), ("real+synthetic", 1.0, 1), ("synthetic", 1.0, 0), ("synthetic", 1.0, 1)]
    assert all(0.0 <= float(r["mdice"]) <= 1.0 for r in rows)
    # Synthetic pairs made from the 4 test masks are excluded: ratio 1 of 16 train pairs gets the 16 others.
    assert "excluded 4 synthetic pairs generated from test masks" in caplog.text
    assert {int(r["n_synthetic"]) for r in rows if r["ratio"] == "1.0"} == {16}
    report = (out / "report.md").read_text()
    assert "| real + synthetic ×0.5 | 16 | 8 | 2 |" in report
    assert cv2.imread(str(out / "benchmark.png")) is not None
    caplog.clear()
    assert bench_tool.main(args) == 0  # resume: nothing left to run
    assert "8 runs (8 done)" in caplog.text
    caplog.set_level(logging.ERROR)
    assert bench_tool.main([*args[:-len(QUICK)], "--seg-steps", "16", "--resolution", "32", "--no-progress"]) == 1
    assert "made with other settings" in caplog.text


def test_evaluate_writes_one_report(data, tmp_path):
    real, synth = data
    out = tmp_path / "eval"
    assert evaluate_tool.main(["--real", str(real), "--synthetic", str(synth), "--out", str(out), "--seeds", "1",
                               "--arms", "real,real+synthetic", "--features", "tiny", *QUICK]) == 0
    result = json.loads((out / "report.json").read_text())
    assert {row["arm"] for row in result["benchmark"]} == {"real", "real+synthetic"}
    fidelity = result["fidelity"][str(synth)]
    assert fidelity["pairs"] == 20 and 0.0 <= fidelity["dice_mean"] <= 1.0
    per_pair = [json.loads(line) for line in (out / "fidelity" / "synth.jsonl").read_text().splitlines()]
    assert len(per_pair) == 20 and {"name", "dice", "mask_area"} <= set(per_pair[0])
    q = result["quality"]
    assert q["fid"] >= 0.0 and q["fid_images"] == 16 and "kid_mean" in q
    assert q["memorisation"]["n_synthetic"] == 20 and (out / "memorisation.png").is_file()
    text = (out / "report.md").read_text()
    assert "Mask fidelity" in text and "FID" in text and "Memorisation" in text


def test_evaluate_refuses_bad_inputs_in_one_line(data, tmp_path, caplog):
    real, synth = data
    caplog.set_level(logging.ERROR)
    base = ["--real", str(real), "--synthetic", str(synth), "--no-benchmark", *QUICK]
    assert evaluate_tool.main([*base, "--out", str(tmp_path / "a"), "--inception", str(tmp_path / "none.pth")]) == 1
    assert "pt_inception-2015-12-05" in caplog.text
    assert evaluate_tool.main([*base, "--out", str(tmp_path / "b"), "--features", "tiny", "--fid-count", "500"]) == 1
    assert "only 16 real images for a count of 500" in caplog.text
    assert evaluate_tool.main(["--real", str(real), "--synthetic", str(tmp_path), "--out", str(tmp_path / "c"),
                               "--no-benchmark", *QUICK]) == 1
    assert "manifest.jsonl" in caplog.text
