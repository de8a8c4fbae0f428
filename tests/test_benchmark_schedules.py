"""The benchmark's schedules beyond mixing, on tiny generated data split first: pretrain-finetune within the same
optimiser budget, the ratio sweep per ratio and seed, filtered vs all (a filter's kept pairs beside their source) —
each row keyed by its schedule, a changed schedule recomputed — and the one-line refusal of colliding stems."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import numpy as np
import pytest

from siamese.data.masks import mask_to_png
from siamese.data.provenance import Provenance, dataset_record, digest_file
from siamese.data.synthetic import synthetic_pair, write_synthetic_dataset
from siamese.evaluation.benchmark import BenchmarkConfig
from siamese.evaluation.segmenter import SegmenterConfig, train_segmenter
from siamese.evaluation.splits import real_pairs
from tools import segmentation_benchmark as bench_tool
from tools import split as split_tool

QUICK = ["--seg-steps", "16", "--resolution", "32", "--seg-batch", "4", "--no-progress"]


def sampling_run(folder: Path, masks_root: Path, seed: int, trained_on: Path, what: str | None = None) -> Path:
    """A tutorial_inference.py output folder: images/, masks/, manifest.jsonl (sources relative, with digests) and
    provenance.json (the generator's training data ``trained_on``; ``what`` names the record)."""
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
    Provenance((dataset_record(what or f"Siamese-Diffusion run on {trained_on.name}", trained_on,
                               [p.image for p in seen], [p.mask for p in seen]),)).write(folder)
    return folder


def filtered_copy(src: Path, out: Path, keep: int, skip: int = 0) -> Path:
    """What tools.filter_pairs writes, reduced: ``keep`` of SRC's pairs (the same files), their manifest lines with
    sources relative to OUT, SRC's provenance and a filter_report.json naming SRC."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    lines = []
    for line in (src / "manifest.jsonl").read_text().splitlines()[skip:skip + keep]:
        record = json.loads(line)
        for key in ("image", "mask"):
            shutil.copy(src / record[key], out / record[key])
        record["source"] = os.path.relpath(src / record["source"], out)
        lines.append(json.dumps(record))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    shutil.copy(src / "provenance.json", out / "provenance.json")
    (out / "filter_report.json").write_text(json.dumps({"source": str(src)}))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(split, synthetic folder from all 20 masks, its filtered copy of 10 pairs)."""
    root = tmp_path_factory.mktemp("sched")
    write_synthetic_dataset(root / "real", 20, 32, seed=0)
    assert split_tool.main([str(root / "real"), "--out", str(root / "split"), "--test-fraction", "0.2"]) == 0
    synth = sampling_run(root / "synth", root / "real", seed=7, trained_on=root / "split" / "train")
    return root / "split", synth, filtered_copy(synth, root / "synth_f", keep=10)


def _rows(out: Path) -> list[dict]:
    with (out / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_pretrain_finetune_spends_the_same_budget_and_a_changed_schedule_recomputes(data, tmp_path, caplog):
    split, synth, _ = data
    out = tmp_path / "b"
    args = ["--real", str(split), "--synthetic", str(synth), "--out", str(out), "--seeds", "1",
            "--arms", "real,synthetic,pretrain-finetune", *QUICK]
    assert bench_tool.main(args) == 0
    rows = {r["arm"]: r for r in _rows(out)}
    assert rows["pretrain-finetune"]["steps"] == "8 synthetic + 8 real" and rows["real"]["steps"] == "16"
    assert rows["pretrain-finetune"]["n_real"] == "16" and rows["pretrain-finetune"]["n_synthetic"] == "16"
    assert len({r["inputs"] for r in rows.values()}) == 3  # the schedule is in the key
    assert "| pretrain-finetune (8 synthetic + 8 real steps) | 16 | 16 | 1 |" in (out / "report.md").read_text()
    caplog.set_level(logging.INFO)
    assert bench_tool.main([*args, "--pretrain-share", "0.25"]) == 0  # another split of the budget
    assert "3 runs (2 done)" in caplog.text and "1 rows of" in caplog.text
    assert {r["arm"]: r for r in _rows(out)}["pretrain-finetune"]["steps"] == "4 synthetic + 12 real"
    assert BenchmarkConfig(segmenter=SegmenterConfig(steps=300), pretrain_share=0.5).phases() == (150, 150)
    with pytest.raises(ValueError, match="pretrain-share"):
        BenchmarkConfig(pretrain_share=1.0)


def test_fine_tuning_continues_the_given_network(data):
    split, _, _ = data
    pairs = [(cv2.cvtColor(cv2.imread(str(p.image)), cv2.COLOR_BGR2RGB), (cv2.imread(str(p.mask), 0) > 127)
              .astype(np.uint8)) for p in real_pairs(split / "train")[:4]]
    cfg = SegmenterConfig(resolution=32, steps=2, batch_size=2)
    first = train_segmenter(pairs, cfg, seed=0, progress=False)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    again = train_segmenter(pairs, cfg, seed=0, progress=False, model=first)
    assert again is first and any(not (v == before[k]).all() for k, v in again.state_dict().items())


def test_the_ratio_sweep_is_reported_per_ratio_with_its_seeds(data, tmp_path):
    split, synth, _ = data
    out = tmp_path / "b"
    assert bench_tool.main(["--real", str(split), "--synthetic", str(synth), "--out", str(out), "--seeds", "2",
                            "--arms", "real+synthetic", "--synthetic-ratio", "0.5,1", *QUICK]) == 0
    assert [(r["ratio"], r["seed"], r["n_synthetic"]) for r in _rows(out)] == [
        ("0.5", "0", "8"), ("0.5", "1", "8"), ("1.0", "0", "16"), ("1.0", "1", "16")]
    report = (out / "report.md").read_text()
    assert "| real + synthetic ×0.5 | 16 | 8 | 2 |" in report and "| real + synthetic ×1 | 16 | 16 | 2 |" in report


def test_filtered_vs_all_runs_each_synthetic_schedule_on_both_pools(data, tmp_path, caplog):
    split, synth, filtered = data
    out = tmp_path / "b"
    args = ["--real", str(split), "--synthetic", str(synth), "--out", str(out), "--seeds", "1",
            "--arms", "real,real+synthetic,synthetic", *QUICK]
    assert bench_tool.main([*args, "--filtered", str(filtered)]) == 0
    rows = [(r["arm"], r["pool"], r["n_synthetic"]) for r in _rows(out)]
    # The filter kept 10 pairs; those generated from test masks are dropped from both pools.
    kept = int(rows[3][2])
    assert rows == [("real", "all", "0"), ("real+synthetic", "all", "16"), ("synthetic", "all", "16"),
                    ("real+synthetic", "filtered", str(kept)), ("synthetic", "filtered", str(kept))]
    assert 0 < kept <= 10
    report = (out / "report.md").read_text()
    assert "real + synthetic ×1 (filtered pairs)" in report and "synthetic (filtered pairs)" in report
    # Another filter output: only the filtered rows are recomputed.
    other = filtered_copy(synth, tmp_path / "synth_f2", keep=12, skip=4)
    caplog.set_level(logging.INFO)
    assert bench_tool.main([*args, "--filtered", str(other)]) == 0
    assert "5 runs (3 done)" in caplog.text


def test_filtered_pairs_must_come_from_the_synthetic_folders(data, tmp_path, caplog):
    split, synth, filtered = data
    stranger = sampling_run(tmp_path / "other", split.parent / "real", seed=11, trained_on=split / "train")
    base = ["--real", str(split), "--out", str(tmp_path / "b"), "--seeds", "1", *QUICK]
    assert bench_tool.main([*base, "--synthetic", str(synth), "--filtered", str(stranger)]) == 1
    assert "is none of the --synthetic pairs" in caplog.text
    assert bench_tool.main([*base, "--arms", "real", "--filtered", str(filtered)]) == 1
    assert "give the --synthetic folders" in caplog.text
    assert not (tmp_path / "b" / "results.csv").exists()


def _collide(root: Path) -> Path:
    """A dataset whose images/ holds synthetic_000000.png (pair 0's) and synthetic_000000.jpg (pair 1's image)."""
    write_synthetic_dataset(root, 10, 32, seed=3)
    records = [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]
    twin = (root / records[0]["target"]).with_suffix(".jpg")
    cv2.imwrite(str(twin), cv2.imread(str(root / records[1]["target"])))
    (root / records[1]["target"]).unlink()
    records[1]["target"] = str(twin.relative_to(root))
    (root / "prompt.json").write_text("\n".join(map(json.dumps, records)) + "\n")
    return root


def _copy_run(src: Path, dst: Path) -> list[dict]:
    """A copy of a sampling folder elsewhere, its relative sources still resolving; returns its manifest records."""
    shutil.copytree(src, dst)
    records = [json.loads(line) for line in (src / "manifest.jsonl").read_text().splitlines()]
    for record in records:
        record["source"] = os.path.relpath((src / record["source"]).resolve(), dst)
    (dst / "manifest.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    return records


def test_colliding_stems_are_refused_in_one_line(data, tmp_path, caplog):
    split, synth, _ = data
    real = _collide(tmp_path / "real")
    assert bench_tool.main(["--real", str(real), "--out", str(tmp_path / "b"), "--arms", "real", *QUICK]) == 1
    assert "share the stem 'synthetic_000000'" in caplog.text and "one pair name would stand for two images" in \
        caplog.text
    assert not (tmp_path / "b" / "splits.json").exists()  # refused before anything is written
    # A synthetic folder with a.png and a.jpg among its images.
    twin = tmp_path / "twin"
    records = _copy_run(synth, twin)
    jpg = Path(records[0]["image"]).with_suffix(".jpg")
    cv2.imwrite(str(twin / jpg), cv2.imread(str(twin / records[1]["image"])))
    records[1]["image"] = str(jpg)
    (twin / "manifest.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
    caplog.clear()
    base = ["--real", str(split), "--out", str(tmp_path / "c"), "--seeds", "1", "--arms", "real,synthetic", *QUICK]
    assert bench_tool.main([*base, "--synthetic", str(twin)]) == 1
    assert "share the stem" in caplog.text and str(twin) in caplog.text
    # The same folder twice, or one image pooled twice, is refused; two folders of one name are kept apart.
    caplog.clear()
    assert bench_tool.main([*base, "--synthetic", str(synth), "--synthetic", str(synth)]) == 1
    assert "a folder is given twice" in caplog.text
    caplog.clear()
    _copy_run(synth, tmp_path / "copy" / "synth")
    assert bench_tool.main([*base, "--synthetic", str(synth), "--synthetic", str(tmp_path / "copy" / "synth")]) == 1
    assert "are the same pair: pooled it would count twice" in caplog.text
    other = sampling_run(tmp_path / "b2" / "synth", split.parent / "real", seed=9, trained_on=split / "train")
    assert bench_tool.main([*base, "--synthetic", str(synth), "--synthetic", str(other)]) == 0


def test_real_images_are_decoded_with_the_benchmark_intensity_and_it_keys_the_results(tmp_path):
    """12-bit images in 16-bit files: the benchmark reads them with --intensity (the generators' data.intensity);
    the mode keys every segmenter and row, and ``auto`` keeps the keys that were made before it could be chosen."""
    from siamese.data.split import Pair
    from siamese.evaluation.benchmark import Inputs, load_pairs, row_key, segmenter_key
    from siamese.evaluation.splits import RealSplit

    ramp = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)  # 12-bit values, not the full range
    cv2.imwrite(str(tmp_path / "a.png"), ramp)
    cv2.imwrite(str(tmp_path / "a_mask.png"), mask_to_png((ramp > 2000).astype(np.uint8)))
    pair = Pair("a", tmp_path / "a.png", tmp_path / "a_mask.png")
    (auto, mask), = load_pairs([pair])
    (stretched, _), = load_pairs([pair], "minmax")
    assert auto.max() == round(3000 * 255 / 4095) and stretched.min() == 0 and stretched.max() == 255
    assert mask.sum() == (ramp > 2000).sum()
    from siamese.evaluation.features import ImageFile, pixel_vectors  # FID, memorisation: decoded the same way

    assert np.array_equal(pixel_vectors([ImageFile(pair.image, "minmax")], size=32)[0],
                          pixel_vectors([stretched], size=32)[0])
    assert not np.array_equal(pixel_vectors([pair.image], size=32), pixel_vectors([stretched], size=32))
    with pytest.raises(ValueError, match="intensity"):
        BenchmarkConfig(intensity="bright")
    seg = SegmenterConfig()
    assert segmenter_key([["d"]], seg, 0) == segmenter_key([["d"]], seg, 0, "auto")
    assert segmenter_key([["d"]], seg, 0) != segmenter_key([["d"]], seg, 0, "minmax")
    inputs = Inputs(RealSplit([pair], [pair], origin="test"), [])
    assert row_key("real", 1.0, 0, 0, inputs, seg) != row_key("real", 1.0, 0, 0, inputs, seg, intensity="minmax")
