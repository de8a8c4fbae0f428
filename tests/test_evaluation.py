"""The evaluation tools end to end on tiny generated data, split first (``tools.split``): explicit splits that leak
nothing, the provenance leak check, the downstream benchmark (resumable, its rows keyed by their inputs), mask
fidelity with the real-data segmenter, and ``tools.evaluate``'s one report — plus their one-line refusals."""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import pytest

from siamese.data.masks import mask_to_png
from siamese.data.provenance import Provenance, dataset_record, digest_file
from siamese.data.synthetic import synthetic_pair, write_synthetic_dataset
from siamese.evaluation.splits import Pair, check_no_leak, load_or_make_split, make_split, real_pairs
from tools import evaluate as evaluate_tool
from tools import segmentation_benchmark as bench_tool
from tools import split as split_tool

QUICK = ["--seg-steps", "15", "--resolution", "32", "--seg-batch", "4", "--no-progress"]


def _sampling_run(folder: Path, masks_root: Path, seed: int, trained_on: Path) -> Path:
    """A sampling output folder as tutorial_inference.py writes it: images/, masks/, manifest.jsonl (sources relative
    to the folder, with digests) and provenance.json (the generator's training data, ``trained_on``)."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    lines = []
    for pair in real_pairs(masks_root):
        rgb, mask = synthetic_pair(int(pair.name.split("_")[-1]), 32, seed)
        name = f"{pair.name}_k0"
        cv2.imwrite(str(folder / "images" / f"{name}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / "masks" / f"{name}.png"), mask_to_png(mask))
        lines.append(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "source": os.path.relpath(pair.mask, folder),
                                 "source_digest": digest_file(pair.mask), "k": 0}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    seen = real_pairs(trained_on)
    Provenance((dataset_record(f"Siamese-Diffusion run on {trained_on.name}", trained_on, [p.image for p in seen],
                               [p.mask for p in seen]),)).write(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(split folder, clean synthetic folder): the generator trained on split/train; its masks are all 20 (the 4
    test masks among them, which the benchmark must drop)."""
    root = tmp_path_factory.mktemp("eval")
    write_synthetic_dataset(root / "real", 20, 32, seed=0)
    assert split_tool.main([str(root / "real"), "--out", str(root / "split"), "--test-fraction", "0.2"]) == 0
    return root / "split", _sampling_run(root / "synth", root / "real", seed=7, trained_on=root / "split" / "train")


def test_split_is_seeded_grouped_reused_and_tied_to_its_dataset(data, tmp_path):
    pairs = real_pairs(data[0].parent / "real")
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


def test_the_split_command_writes_two_datasets_and_refuses_to_mix(data, tmp_path, caplog):
    split = data[0]
    record = json.loads((split / "splits.json").read_text())
    assert len(record["train"]) == 16 and len(record["test"]) == 4 and record["seed"] == 0
    train, test = real_pairs(split / "train"), real_pairs(split / "test")
    assert sorted(p.name for p in train) == record["train"] and sorted(p.name for p in test) == record["test"]
    originals = {p.name: p for p in real_pairs(split.parent / "real")}
    assert all(p.image.read_bytes() == originals[p.name].image.read_bytes() for p in test)  # linked, not moved
    assert all(p.image.is_file() for p in originals.values())
    # Same data and settings: kept as it is; other settings: refused, the split untouched.
    assert split_tool.main([str(split.parent / "real"), "--out", str(split)]) == 0
    caplog.set_level(logging.ERROR)
    assert split_tool.main([str(split.parent / "real"), "--out", str(split), "--seed", "5"]) == 1
    assert "pass --force" in caplog.text and json.loads((split / "splits.json").read_text()) == record
    # A file swapped after the split is caught when the split is read.
    copy = tmp_path / "split"
    assert split_tool.main([str(split.parent / "real"), "--out", str(copy)]) == 0
    victim = real_pairs(copy / "test")[0].image
    victim.unlink()
    victim.write_bytes(real_pairs(copy / "train")[0].image.read_bytes())
    caplog.clear()
    assert bench_tool.main(["--real", str(copy), "--out", str(tmp_path / "b"), "--arms", "real", *QUICK]) == 1
    assert "changed after the split" in caplog.text and not (tmp_path / "b").exists()


def test_leaks_are_found_not_assumed(data, tmp_path):
    pairs = real_pairs(data[0].parent / "real")
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
    assert "Split: 16 train / 4 test real pairs" in report
    assert all(len(r["inputs"]) == 16 for r in rows) and len({r["inputs"] for r in rows}) == 8
    caplog.clear()
    assert bench_tool.main(args) == 0  # resume: nothing left to run
    assert "8 runs (8 done)" in caplog.text
    # Other settings: every row is recomputed, none relabelled.
    caplog.clear()
    assert bench_tool.main([*args[:-len(QUICK)], "--seg-steps", "16", "--resolution", "32", "--seg-batch", "4",
                            "--no-progress"]) == 0
    assert "8 rows of" in caplog.text and "8 runs (0 done)" in caplog.text


def test_a_resume_with_other_data_recomputes(data, tmp_path, caplog):
    """Another --synthetic folder, or another --real whose files have the same names, never reuses a row."""
    split, synth = data
    out = tmp_path / "bench"
    base = ["--out", str(out), "--seeds", "1", "--arms", "real,real+synthetic", *QUICK]
    assert bench_tool.main(["--real", str(split), "--synthetic", str(synth), *base]) == 0
    other = _sampling_run(tmp_path / "synth2", split.parent / "real", seed=11, trained_on=split / "train")
    caplog.set_level(logging.INFO)
    assert bench_tool.main(["--real", str(split), "--synthetic", str(other), *base]) == 0
    assert "2 runs (1 done)" in caplog.text  # the real arm's inputs are unchanged; the synthetic arm's are not
    # Same file names, other pixels.
    write_synthetic_dataset(tmp_path / "real_b", 20, 32, seed=5)
    assert split_tool.main([str(tmp_path / "real_b"), "--out", str(tmp_path / "split_b")]) == 0
    other_b = _sampling_run(tmp_path / "synth_b", tmp_path / "real_b", seed=7,
                            trained_on=tmp_path / "split_b" / "train")
    caplog.clear()
    assert bench_tool.main(["--real", str(tmp_path / "split_b"), "--synthetic", str(other_b), *base]) == 0
    assert "2 runs (0 done)" in caplog.text


def test_a_generator_that_saw_the_test_images_is_refused(data, tmp_path, caplog):
    split, _ = data
    leaky = _sampling_run(tmp_path / "leaky", split.parent / "real", seed=7, trained_on=split.parent / "real")
    out = tmp_path / "bench"
    base = ["--real", str(split), "--synthetic", str(leaky), "--out", str(out), "--seeds", "1", "--arms",
            "real,real+synthetic", *QUICK]
    caplog.set_level(logging.ERROR)
    assert bench_tool.main(base) == 1
    assert "Siamese-Diffusion run on real was trained on test pair" in caplog.text
    assert not out.exists()  # refused before anything was written
    caplog.set_level(logging.INFO)
    assert bench_tool.main([*base, "--allow-generator-leak"]) == 0
    assert (out / "report.md").read_text().splitlines()[2].startswith("> **ACCEPTED LEAK")
    # No provenance at all: refused too.
    (leaky / "provenance.json").unlink()
    caplog.clear()
    assert bench_tool.main([*base[:5], str(tmp_path / "b2"), *base[6:]]) == 1
    assert "no provenance.json" in caplog.text


def test_sources_resolve_against_the_manifest_and_unresolvable_ones_are_refused(data, tmp_path, monkeypatch, caplog):
    from siamese.evaluation.leaks import LeakError, check_synthetic

    split, synth = data
    test = real_pairs(split / "test")
    monkeypatch.chdir(tmp_path)  # relative sources are not relative to the working directory
    lines = (synth / "manifest.jsonl").read_text().splitlines()
    bare = [json.dumps({k: v for k, v in json.loads(line).items() if k != "source_digest"}) for line in lines]
    moved = tmp_path / "moved_synth"
    moved.mkdir()
    for sub in ("images", "masks"):
        (moved / sub).symlink_to(synth / sub)
    (moved / "provenance.json").write_bytes((synth / "provenance.json").read_bytes())
    (moved / "manifest.jsonl").write_text("\n".join(bare) + "\n")
    with pytest.raises(LeakError, match="no resolvable source mask"):  # ../real/masks/… is not beside moved_synth
        check_synthetic([moved], test)
    (tmp_path / "real").symlink_to(split.parent / "real")  # now it is: checked by the file's digest
    assert check_synthetic([moved], test).excluded_test_masks == 4
    # The test image as a kept background: refused.
    with_bg = [json.dumps({**json.loads(line), "background_digest": digest_file(test[0].image)}) for line in lines]
    (moved / "manifest.jsonl").write_text("\n".join(with_bg) + "\n")
    with pytest.raises(LeakError, match="as its background"):
        check_synthetic([moved], test)


def test_evaluate_writes_one_report(data, tmp_path):
    real, synth = data
    out = tmp_path / "eval"
    args = ["--real", str(real), "--synthetic", str(synth), "--out", str(out), "--seeds", "1",
            "--arms", "real,real+synthetic", "--features", "tiny", *QUICK]
    assert evaluate_tool.main(args) == 0
    result = json.loads((out / "report.json").read_text())
    assert result["split"]["train"] == 16 and result["leak_check"]["excluded_test_masks"] == 4
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
    # The fidelity segmenter is reused only for the same inputs: other segmenter settings train it again.
    before = (out / "segmenter_real_seed0.safetensors").stat().st_mtime_ns
    assert evaluate_tool.main([*args[:-len(QUICK)], "--no-benchmark", "--seg-steps", "12", "--resolution", "32",
                               "--no-progress"]) == 0
    assert (out / "segmenter_real_seed0.safetensors").stat().st_mtime_ns != before


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


def test_near_duplicates_find_a_re_encoded_test_image_and_no_distinct_one(data, tmp_path):
    from siamese.evaluation.leaks import near_duplicates

    split, _ = data
    train, test = real_pairs(split / "train"), real_pairs(split / "test")
    assert near_duplicates(train, test) == []  # 16 × 4 distinct generated images
    image = cv2.imread(str(test[1].image))
    copy = tmp_path / "copy.jpg"
    cv2.imwrite(str(copy), cv2.resize(image, (48, 48), interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 70])
    found = near_duplicates([*train, Pair("renamed", copy, train[0].mask)], test)
    assert [(a, b) for a, b, _ in found] == [("renamed", test[1].name)] and found[0][2] > 0.95


def test_two_runs_of_one_basename_get_their_own_fidelity_file_fid_and_kid(data, tmp_path):
    split, synth = data
    other = _sampling_run(tmp_path / "controlnet" / "synth", split.parent / "real", seed=9,
                          trained_on=split / "train")
    out = tmp_path / "eval"
    assert evaluate_tool.main(["--real", str(split), "--synthetic", str(synth), "--synthetic", str(other), "--out",
                               str(out), "--no-benchmark", "--features", "tiny", *QUICK]) == 0
    assert len(list((out / "fidelity").glob("*.jsonl"))) == 2  # not one overwriting the other
    runs = json.loads((out / "report.json").read_text())["quality"]["per_run"]
    assert set(runs) == {str(synth), str(other)} and "fid" not in json.loads((out / "report.json").read_text())
    for run in runs.values():
        assert run["fid"] >= 0 and run["kid_subset"] == 8 and run["kid_std"] > 0  # subsets of half the 16 images
    assert (out / "report.md").read_text().count("| 16 |") == 2
