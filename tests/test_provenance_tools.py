"""Provenance through every model file and folder the tools write (issue 20), on the real tools at the tiny
geometry: tool_add_control.py → training (EMA export too) → zero_to_fp32.py → tool_merge_control.py →
tutorial_inference.py; the diffusers export; base pretraining; the mask generator and the pairs sampled from its
masks; background repair and pairs on those backgrounds; the folders the filter and the erosion derive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)
from ldm.checkpoint import read_metadata, save_state_dict

import pytest

from siamese.config import checkpoint_metadata, checkpoint_provenance, load_config
from siamese.data.layout import read_prompt_jsonl
from siamese.data.provenance import (
    METADATA_PROVENANCE,
    PROVENANCE_FILE,
    Provenance,
    digest_file,
    external,
    read_provenance,
)
from siamese.data.synthetic import write_synthetic_dataset
from siamese.factory import build_model
from siamese.run_dir import RUN_FILES, find_run_provenance, resume_config, run_provenance
from tools import erode_masks, export_diffusers, filter_pairs, maskgen, pretrain, repair_backgrounds
from tools import inference as inference_tool
from tools import merge_control as merge_tool
from tools import train as train_tool
from tools import zero_to_fp32 as zero_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
CONTROLNET_TINY = REPO / "configs" / "controlnet_tiny.yaml"
MASKGEN = REPO / "configs" / "maskgen_tiny.yaml"
BASE = REPO / "configs" / "base_tiny.yaml"
SHIPPED_BASE = REPO / "data" / "pretrained" / "base_tiny.safetensors"
MASKGEN_TINY = ["maskgen.resolution=32", "maskgen.unet.model_channels=8", "maskgen.unet.channel_mult=[1,2]",
                "maskgen.unet.num_heads=2", "maskgen.total_steps=2", "maskgen.batch_size=4",
                "train.checkpoint_every=2"]


def _digests(pairs_file: Path) -> tuple[set[str], set[str]]:
    records = read_prompt_jsonl(pairs_file)
    return {digest_file(r.target) for r in records}, {digest_file(r.source) for r in records}


def _lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _sample(ckpt: Path, masks: Path, out: Path, *extra: str) -> int:
    return inference_tool.main(["--ckpt", str(ckpt), "--masks", str(masks), "--out", str(out), "--steps", "1",
                                "--limit", "3", "--no-progress", *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory, init_ckpt):
    """A real dataset → 2 training steps from tool_add_control.py's init (EMA on) → fp32 export → merge."""
    root = tmp_path_factory.mktemp("chain")
    write_synthetic_dataset(root / "data", 4, 64, seed=0)
    run = root / "run"
    cfg = load_config(TINY, [f"train.output_dir={run}", "train.total_steps=2", "train.checkpoint_every=2",
                             "train.image_log_every=0", f"data.root={root / 'data'}", f"train.init_ckpt={init_ckpt}",
                             "train.batch_size=2", "train.ema.enabled=true", "train.ema.decay=0.5"])
    train_tool.train(cfg)
    trained, merged = root / "trained.safetensors", root / "merged.safetensors"
    assert zero_tool.main([str(run / "checkpoints" / "step=2.ckpt"), str(trained)]) == 0
    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(trained), "--out", str(merged)]) == 0
    return {"root": root, "data": root / "data", "run": run, "trained": trained, "merged": merged}


def test_add_control_train_export_merge_carry_the_training_data(chain, init_ckpt):
    # tool_add_control.py records its base: a file without provenance, so an external record naming it.
    base = checkpoint_provenance(init_ckpt)
    assert [r.what for r in base.records] == ["checkpoint sd_base.safetensors"] and base.external()
    images, masks = _digests(chain["data"] / "prompt.json")
    run = run_provenance(chain["run"])
    assert run is not None and run.records[0] == base.records[0] and len(run.trained()) == 1
    assert set(run.trained()[0].images) == images and set(run.trained()[0].masks) == masks
    assert PROVENANCE_FILE in RUN_FILES  # --force clears it with the run
    # Found from any checkpoint path inside the run; carried by the EMA export, the fp32 file and the merge.
    assert find_run_provenance(chain["run"] / "checkpoints" / "step=2.ckpt" / "checkpoint") == run
    for path in (chain["run"] / "ema_trainable.safetensors", chain["trained"], chain["merged"]):
        assert METADATA_PROVENANCE in read_metadata(path), path
        assert checkpoint_provenance(path) == run, path
    # A checkpoint outside any run (no provenance.json above it) gets an external record naming it.
    loose = chain["root"] / "loose" / "step=2.ckpt"
    shutil.copytree(chain["run"] / "checkpoints" / "step=2.ckpt", loose)
    assert find_run_provenance(loose) is None
    assert zero_tool.main([str(loose), str(chain["root"] / "loose.safetensors"), "--config", str(chain["run"] /
                                                                                                 "config.yaml")]) == 0
    assert [r.what for r in checkpoint_provenance(chain["root"] / "loose.safetensors").records] == \
        ["checkpoint step=2.ckpt"]


def test_resumed_run_keeps_its_provenance(chain, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(chain["run"], run)
    before = (run / PROVENANCE_FILE).read_bytes()
    shutil.rmtree(run / "logs")
    cfg, changes = resume_config(run, ["train.total_steps=3"])
    assert train_tool.train(cfg, resume="latest", changes=changes).global_step == 3
    assert (run / PROVENANCE_FILE).read_bytes() == before


def test_pairs_name_sources_relative_to_out_and_record_the_models(chain, tmp_path, monkeypatch, caplog):
    out = tmp_path / "pairs"
    assert _sample(chain["merged"], chain["data"] / "masks", out) == 0
    found = read_provenance(out)
    assert found == checkpoint_provenance(chain["merged"])
    assert set(found.trained()[0].images) == _digests(chain["data"] / "prompt.json")[0]
    lines = _lines(out)
    assert len(lines) == 3 and all(not Path(line["source"]).is_absolute() for line in lines)
    monkeypatch.chdir(tmp_path.parent)  # relative to OUT: they resolve from any working directory
    for line in lines:
        assert digest_file(out / line["source"]) == line["source_digest"]
    assert _sample(chain["merged"], chain["data"] / "masks", out) == 0  # a resume with the same inputs
    assert _lines(out) == lines
    # Another mask folder's records (a provenance.json beside the masks) make another provenance: refused.
    masks = tmp_path / "masks"
    shutil.copytree(chain["data"] / "masks", masks)
    Provenance((external("somebody's masks"),)).write(masks)
    assert _sample(chain["merged"], masks, out) == 1
    assert "the provenance differs" in caplog.text


def test_old_manifest_lines_without_digests_still_resume(chain, tmp_path):
    out = tmp_path / "pairs"
    assert _sample(chain["merged"], chain["data"] / "masks", out) == 0
    old = [{k: v for k, v in line.items() if k != "source_digest"} | {"source": "elsewhere/x.png"}
           for line in _lines(out)]
    (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in old))
    (out / PROVENANCE_FILE).unlink()
    assert _sample(chain["merged"], chain["data"] / "masks", out) == 0
    assert _lines(out) == old  # complete pairs kept as they were


def test_diffusers_export_carries_the_checkpoint_provenance(tmp_path):
    cfg = load_config(CONTROLNET_TINY, ["model.control.hint_encoder=hi"])
    provenance = Provenance((external("a test base"),))
    ckpt = tmp_path / "merged.safetensors"
    save_state_dict(build_model(cfg.model).state_dict(), ckpt, metadata=checkpoint_metadata(cfg, "merged",
                                                                                            provenance))
    assert export_diffusers.main([str(ckpt), str(tmp_path / "export")]) == 0
    assert checkpoint_provenance(tmp_path / "export" / "diffusion_pytorch_model.safetensors") == provenance


def test_pretraining_records_its_images_in_both_stage_files(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 4, 64, seed=1)
    out = tmp_path / "base"
    overrides = [f"train.output_dir={out}", f"data.root={data}", "train.checkpoint_every=1",
                 "train.image_log_every=0", "pretrain.autoencoder.total_steps=1", "pretrain.autoencoder.batch_size=2",
                 "pretrain.autoencoder.calibrate_samples=2", "pretrain.unet.total_steps=1",
                 "pretrain.unet.batch_size=2"]
    assert pretrain.main(["--config", str(BASE), *overrides]) == 0
    images, _ = _digests(data / "prompt.json")
    first = checkpoint_provenance(out / "autoencoder.safetensors")
    assert first == run_provenance(out / "autoencoder")
    assert [set(r.images) for r in first.trained()] == [images]
    base = checkpoint_provenance(out / "base.safetensors")
    assert base == run_provenance(out / "unet") and base.records[0] == first.records[0]  # stage 1 inherited
    assert [set(r.images) for r in base.trained()] == [images, images]
    assert [r.what for r in base.trained()] == [f"base pretraining run {out / 'autoencoder'}",
                                                f"base pretraining run {out / 'unet'}"]


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskgen")
    write_synthetic_dataset(root / "data", 4, 64, seed=2)
    ckpt = root / "maskgen.safetensors"
    assert maskgen.main(["train", "--config", str(MASKGEN), f"train.output_dir={root / 'run'}",
                         f"data.root={root / 'data'}", *MASKGEN_TINY, "--out", str(ckpt)]) == 0
    return root, ckpt


def test_mask_generator_records_its_masks_and_its_samples_inherit_them(generator, chain, tmp_path):
    root, ckpt = generator
    found = checkpoint_provenance(ckpt)
    assert found == run_provenance(root / "run" / "maskgen")
    [record] = found.records
    assert record.role == "trained" and not record.images
    assert set(record.masks) == _digests(root / "data" / "prompt.json")[1]
    gen = tmp_path / "gen"
    assert maskgen.main(["sample", "--ckpt", str(ckpt), "--out", str(gen), "--n", "2", "--steps", "2"]) == 0
    assert read_provenance(gen) == found
    # Pairs sampled from the generated masks: the pair model's records and the mask generator's.
    pairs = tmp_path / "pairs"
    assert _sample(chain["merged"], gen / "masks", pairs) == 0
    assert read_provenance(pairs) == checkpoint_provenance(chain["merged"]).merge(found)


def test_repaired_backgrounds_record_their_source_images(chain, tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 3, 64, seed=3)
    upstream = Provenance((external("the dataset's own source"),))
    upstream.write(data)
    out = tmp_path / "bg"
    assert repair_backgrounds.main(["--ckpt", str(SHIPPED_BASE), "--data", str(data), "--out", str(out),
                                    "--steps", "1", "--limit", "2", "--grid", "0"]) == 0
    found = read_provenance(out)
    content = found.records[0]
    assert content.role == "content" and content.what == f"backgrounds repaired from {data}"
    pairs = read_prompt_jsonl(data / "prompt.json")[:2]
    assert content.images == tuple(digest_file(p.target) for p in pairs)
    assert content.masks == tuple(digest_file(p.source) for p in pairs)
    assert upstream.records[0] in found.records
    assert checkpoint_provenance(SHIPPED_BASE).records[0] in found.records  # the non-lesion generator
    # Pairs on these backgrounds inherit the library's records; each line names its background by digest.
    synth = tmp_path / "synth"
    assert _sample(chain["merged"], chain["data"] / "masks", synth, "--background", str(out)) == 0
    assert read_provenance(synth) == checkpoint_provenance(chain["merged"]).merge(found)
    for line in _lines(synth):
        assert digest_file(synth / line["background"]) == line["background_digest"]
    # A plain folder of images without provenance.json: a content record of its files.
    plain = tmp_path / "plain"
    shutil.copytree(out / "images", plain)
    library = inference_tool.sampling_provenance(chain["merged"], chain["data"] / "masks", plain).records[-1]
    assert (library.role, library.what) == ("content", f"backgrounds {plain}")
    assert set(library.images) == {digest_file(p) for p in plain.iterdir()} and len(library.images) == 2


def _check_derived(src: Path, out: Path) -> None:
    assert (out / PROVENANCE_FILE).read_bytes() == (src / PROVENANCE_FILE).read_bytes()
    for line in _lines(out):
        assert not Path(line["source"]).is_absolute()
        assert digest_file(out / line["source"]) == line["source_digest"]


def test_filter_and_erosion_keep_the_provenance(chain, tmp_path):
    src = tmp_path / "src"
    assert _sample(chain["merged"], chain["data"] / "masks", src, "--n-per-mask", "2", "--limit", "4") == 0
    eroded = tmp_path / "eroded"
    assert erode_masks.main([str(src), "--out", str(eroded), "--erode", "1"]) == 0
    _check_derived(src, eroded)
    kept = tmp_path / "deeper" / "kept"  # another depth: relative sources must be rebased, not copied
    assert filter_pairs.main([str(src), "--real", str(chain["data"]), "--out", str(kept), "--features", "tiny",
                              "--low", "-1", "--high", "1", "--no-progress"]) == 0
    _check_derived(src, kept)
