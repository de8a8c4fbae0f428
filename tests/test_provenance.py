"""Provenance through the whole chain, on real tools at the tiny geometry: split → tool_add_control.py → training →
zero_to_fp32.py → tool_merge_control.py → tutorial_inference.py → the benchmark's leak check. A generator trained on
the full dataset (test images included) is refused by the benchmark; one trained on the train side is accepted."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)
from ldm.checkpoint import read_metadata

import pytest

from siamese.config import checkpoint_provenance, load_config
from siamese.data.provenance import METADATA_PROVENANCE, digest_file, read_provenance
from siamese.data.split import real_pairs
from siamese.data.synthetic import write_synthetic_dataset
from siamese.evaluation.leaks import check_synthetic
from tools import inference as inference_tool
from tools import merge_control as merge_tool
from tools import segmentation_benchmark as bench_tool
from tools import split as split_tool
from tools import train as train_tool
from tools import zero_to_fp32 as zero_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"


def _generator(root: Path, data: Path, init_ckpt: Path, name: str) -> Path:
    """Train 2 steps on ``data``, export, merge: the merged checkpoint."""
    run = root / f"run_{name}"
    cfg = load_config(TINY, [f"train.output_dir={run}", "train.total_steps=2", "train.checkpoint_every=2",
                             "train.image_log_every=0", f"data.root={data}", f"train.init_ckpt={init_ckpt}",
                             "train.batch_size=2"])
    train_tool.train(cfg)
    trained, merged = root / f"{name}_trained.safetensors", root / f"{name}.safetensors"
    assert zero_tool.main([str(run / "checkpoints" / "step=2.ckpt"), str(trained)]) == 0
    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(trained), "--out", str(merged)]) == 0
    return merged


def _sample(ckpt: Path, masks: Path, out: Path) -> Path:
    assert inference_tool.main(["--ckpt", str(ckpt), "--masks", str(masks), "--out", str(out), "--steps", "1",
                                "--limit", "4", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def chain(tmp_path_factory, init_ckpt):
    root = tmp_path_factory.mktemp("prov")
    write_synthetic_dataset(root / "data", 10, 64, seed=0)
    assert split_tool.main([str(root / "data"), "--out", str(root / "split")]) == 0
    leaky = _generator(root, root / "data", init_ckpt, "leaky")
    clean = _generator(root, root / "split" / "train", init_ckpt, "clean")
    return root, leaky, clean


def test_every_model_file_carries_what_it_was_trained_on(chain, init_ckpt):
    root, _, clean = chain
    train = real_pairs(root / "split" / "train")
    run = read_provenance(root / "run_clean")
    assert run is not None and [r.role for r in run.records] == ["external", "trained"]  # the random base, the data
    assert set(run.trained()[0].images) == {digest_file(p.image) for p in train}
    assert set(run.trained()[0].masks) == {digest_file(p.mask) for p in train}
    for path in (root / "clean_trained.safetensors", clean):  # the fp32 export and the merge inherit it
        assert METADATA_PROVENANCE in read_metadata(path)
        assert checkpoint_provenance(path).trained() == run.trained()
    assert checkpoint_provenance(init_ckpt).external()  # made from a base the framework knows nothing of


def test_sampling_records_its_models_and_masks_by_digest(chain, tmp_path, monkeypatch):
    root, _, clean = chain
    out = _sample(clean, root / "split" / "train" / "masks", tmp_path / "synth")
    assert read_provenance(out) == checkpoint_provenance(clean)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert all(not Path(line["source"]).is_absolute() for line in lines)
    monkeypatch.chdir(tmp_path.parent)  # the sources resolve against the manifest, from any working directory
    for line in lines:
        assert digest_file(out / line["source"]) == line["source_digest"]
    # A resumed run into the same folder from another checkpoint is refused (its provenance differs).
    assert inference_tool.main(["--ckpt", str(root / "leaky.safetensors"), "--masks",
                                str(root / "split" / "train" / "masks"), "--out", str(out), "--steps", "1",
                                "--limit", "4", "--no-progress"]) == 1


def test_the_benchmark_refuses_a_generator_trained_on_the_test_images(chain, tmp_path, caplog):
    root, leaky, clean = chain
    masks = root / "split" / "train" / "masks"  # even from training masks only: the model itself saw the test side
    leaky_pairs, clean_pairs = _sample(leaky, masks, tmp_path / "leaky"), _sample(clean, masks, tmp_path / "clean")
    out = tmp_path / "bench"
    caplog.set_level(logging.ERROR)
    assert bench_tool.main(["--real", str(root / "split"), "--synthetic", str(leaky_pairs), "--out", str(out),
                            "--arms", "real+synthetic", "--seeds", "1", "--no-progress"]) == 1
    assert f"run {root / 'run_leaky'} was trained on test pair" in caplog.text and not out.exists()
    test = real_pairs(root / "split" / "test")
    report = check_synthetic([clean_pairs], test)
    assert len(report.pairs) == 4 and report.excluded_test_masks == 0
    assert not any(w.startswith("ACCEPTED LEAK") for w in report.warnings)
