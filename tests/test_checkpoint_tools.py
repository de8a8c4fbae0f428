"""Checkpoint tools without training: tool_add_control.py on a tiny base and on a fake SD1.5 base built from the
reference manifest, tool_merge_control.py on hand-made trained files, and every bad input the tools must refuse
with one line, a non-zero exit code and no output file. (The ZeRO round trips live in test_train.py, which owns
the training runs.)"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict

import pytest
import torch
from safetensors.torch import load_file

from cldm.convert import add_control, expected_state, fresh_control_weights
from siamese.config import config_from_metadata, load_config
from siamese.factory import build_model, load_weights, meta_model
from tools import add_control as add_control_tool
from tools import merge_control as merge_tool

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
SD15 = REPO / "configs" / "siamese_sd15.yaml"


def _sd_base(model) -> dict[str, torch.Tensor]:
    """What a Stable Diffusion checkpoint of the model's geometry holds: everything but control_model.*,
    plus the original training's EMA copy."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(2, 2)
    return sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD base checkpoint (pickle, Lightning-style wrapper) and its add_control output."""
    root = tmp_path_factory.mktemp("tools")
    torch.manual_seed(1)
    model = build_model(load_config(TINY).model)
    base = _sd_base(model)
    torch.save({"state_dict": base, "global_step": 470000}, root / "base.ckpt")
    assert add_control_tool.main([str(root / "base.ckpt"), str(root / "init.safetensors"), "--config",
                                  str(TINY), "--seed", "3"]) == 0
    return root, base


def _tmp_leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_add_control_copies_encoder_zeroes_convs_keeps_base(tiny):
    root, base = tiny
    init = load_file(root / "init.safetensors")
    copied = [k for k in init if k.startswith("control_model.") and
              "model.diffusion_model." + k[len("control_model."):] in base]
    assert len(copied) > 50 and any(".middle_block." in k for k in copied) and any("time_embed" in k for k in copied)
    for key in copied:
        assert torch.equal(init[key], base["model.diffusion_model." + key[len("control_model."):]]), key
    zero = [k for k in init if k.startswith(("control_model.zero_convs.", "control_model.middle_block_out."))]
    residuals = meta_model(load_config(TINY).model).control.num_residuals
    assert len(zero) == 2 * residuals and all(not init[k].any() for k in zero)
    hint = [k for k in init if k.startswith("control_model.input_hint_block.")]
    assert hint and any(init[k].abs().sum() > 0 for k in hint)  # seeded, not zero (its last conv is)
    assert set(init) == set(hint) | set(zero) | set(copied) | {k for k in base if not k.startswith("model_ema.")}
    for key, value in base.items():
        if not key.startswith("model_ema."):
            assert torch.equal(init[key], value), key
    model = build_model(load_config(TINY).model)
    load_weights(model, root / "init.safetensors")  # strict
    meta = read_metadata(root / "init.safetensors")
    assert meta["siamese.kind"] == "init" and config_from_metadata(meta, "init") == load_config(TINY)


def test_hint_encoder_init_is_seeded_and_leaves_global_rng_alone():
    model = meta_model(load_config(TINY).model)
    state = torch.random.get_rng_state()
    a, b, c = (fresh_control_weights(model, s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    hint = [k for k in a if "input_hint_block" in k and k.endswith("weight")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in hint)


def test_add_control_on_fake_sd15_base_gives_the_manifest(reference_manifest):
    """SD1.5 geometry without allocating weights: the base is meta tensors named and shaped as in the manifest."""
    model = meta_model(load_config(SD15).model)
    expected = expected_state(model)
    shapes = {k: tuple(v[0]) for k, v in reference_manifest["keys"].items()}
    with torch.device("meta"):
        base = {k: torch.empty(s) for k, s in shapes.items() if not k.startswith("control_model.")}
        base["model_ema.decay"] = torch.empty(())
        base["model_ema.num_updates"] = torch.empty((), dtype=torch.int32)
    base["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out, report = add_control(base, expected, fresh_control_weights(model, 0))
    assert {k: tuple(v.shape) for k, v in out.items()} == shapes
    assert len(report.copied) + len(report.initialised) == sum(k.startswith("control_model.") for k in shapes)
    assert report.ignored == ["model_ema.decay", "model_ema.num_updates"] and not report.derived
    # A base without position_ids and schedule buffers: both are derived from the config.
    schedule = [k for k in shapes if "." not in k]
    slim = {k: v for k, v in base.items() if k not in schedule and not k.endswith("position_ids")}
    out, report = add_control(slim, expected, fresh_control_weights(model, 0))
    assert set(out) == set(shapes) and len(report.derived) == len(schedule) + 1
    assert torch.equal(out["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77)[None])


def _run(main, argv: list[str], caplog) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = main(argv)
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


class _Payload:
    """Unpickling this calls a function: the kind of object safe loading must refuse."""

    def __reduce__(self):
        return (os.path.join, ("a", "b"))


def test_add_control_bad_inputs(tiny, tmp_path, caplog):
    root, base = tiny
    out = tmp_path / "out.safetensors"
    cfg = ["--config", str(TINY)]

    def refused(argv: list[str], *needles: str) -> None:
        rc, errors = _run(add_control_tool.main, argv, caplog)
        assert rc != 0 and len(errors) == 1 and "\n" not in errors[0], errors
        assert all(n in errors[0] for n in needles), errors[0]
        assert not out.exists() and not _tmp_leftovers(tmp_path)

    refused([str(tmp_path / "nope.ckpt"), str(out), *cfg], "not found", "nope.ckpt")
    refused([str(root / "base.ckpt"), str(tmp_path / "out.bin"), *cfg], "out.bin", "extension")
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": base, "x": _Payload()}, evil)
    refused([str(evil), str(out), *cfg], "evil.ckpt", "--unsafe-pickle")
    assert add_control_tool.main([str(evil), str(out), *cfg, "--unsafe-pickle"]) == 0  # the user's explicit choice
    out.unlink()
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes((root / "init.safetensors").read_bytes()[:5000])
    refused([str(truncated), str(out), *cfg], "trunc.safetensors", "truncated or corrupt")
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    wrong = dict(base, **{key: torch.zeros(3, 3)})
    save_state_dict(wrong, tmp_path / "wrong.safetensors")
    refused([str(tmp_path / "wrong.safetensors"), str(out), *cfg], key, "[3, 3]", str(list(base[key].shape)))
    save_state_dict({"vae.weight": torch.zeros(1)}, tmp_path / "other.safetensors")
    refused([str(tmp_path / "other.safetensors"), str(out), *cfg], "not a Stable Diffusion", "model.diffusion_model.*")
    # The tiny base against the SD1.5 config: another geometry.
    refused([str(root / "base.ckpt"), str(out), "--config", str(SD15)], "geometry", "--config")
    out.write_bytes(b"precious")
    rc, errors = _run(add_control_tool.main, [str(root / "base.ckpt"), str(out), *cfg], caplog)
    assert rc != 0 and "--force" in errors[0] and out.read_bytes() == b"precious"
    out.unlink()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, errors = _run(add_control_tool.main, [str(root / "base.ckpt"), str(blocker / "out.safetensors"), *cfg],
                      caplog)
    assert rc != 0 and len(errors) == 1 and str(blocker) in errors[0]


def test_unwritable_output_directory(tiny, unwritable_dir, caplog):
    root, _ = tiny
    rc, errors = _run(add_control_tool.main, [str(root / "base.ckpt"), str(unwritable_dir / "o.safetensors"),
                                              "--config", str(TINY)], caplog)
    assert rc != 0 and len(errors) == 1 and "not writable" in errors[0], errors
    assert not (unwritable_dir / "o.safetensors").exists()


def test_merge_overlays_trained_keys_and_exports_trainable(tiny, tmp_path, caplog):
    root, _ = tiny
    caplog.set_level(logging.INFO)
    init = load_state_dict(root / "init.safetensors")
    cfg = load_config(TINY)
    trainable = meta_model(cfg.model).configure_trainable(cfg.method.sd_locked)
    trained = {k: init[k] + 1.0 for k in trainable}  # an EMA export / trainable-only file
    # A bf16 run's frozen weights come back rounded: the merge keeps the exact base values for them.
    frozen = [k for k in init if k.startswith("first_stage_model.") and init[k].is_floating_point()]
    trained.update({k: init[k].bfloat16().float() for k in frozen})
    assert any(not torch.equal(trained[k], init[k]) for k in frozen)
    save_state_dict(trained, tmp_path / "trained.safetensors")  # no metadata: the config comes from the base
    merged_path = tmp_path / "merged.safetensors"
    assert merge_tool.main(["--base", str(root / "init.safetensors"), "--trained",
                            str(tmp_path / "trained.safetensors"), "--out", str(merged_path)]) == 0
    merged = load_file(merged_path)
    assert set(merged) == set(init)
    assert all(torch.equal(merged[k], trained[k] if k in trainable else init[k]) for k in merged)
    assert "rounded" in caplog.text and "outside the trainable set" not in caplog.text
    assert config_from_metadata(read_metadata(merged_path), "merged") == cfg
    load_weights(build_model(cfg.model), merged_path)  # strict
    share = tmp_path / "share.safetensors"
    assert merge_tool.main(["--base", str(merged_path), "--trained", str(merged_path), "--out", str(share),
                            "--only-trainable"]) == 0
    assert set(load_file(share)) == set(trainable) and read_metadata(share)["siamese.kind"] == "trainable"
    # The shared file merges back onto the init checkpoint into the same weights.
    again = tmp_path / "again.safetensors"
    assert merge_tool.main(["--base", str(root / "init.safetensors"), "--trained", str(share), "--out",
                            str(again)]) == 0
    assert all(torch.equal(v, merged[k]) for k, v in load_file(again).items())


def test_merge_bad_inputs(tiny, tmp_path, caplog):
    root, _ = tiny
    init = root / "init.safetensors"
    out = tmp_path / "m.safetensors"

    def refused(argv: list[str], *needles: str) -> None:
        rc, errors = _run(merge_tool.main, argv, caplog)
        assert rc != 0 and len(errors) == 1 and all(n in errors[0] for n in needles), errors
        assert not out.exists() and not _tmp_leftovers(tmp_path)

    save_state_dict({"control_model.nope.weight": torch.zeros(2)}, tmp_path / "unknown.safetensors")
    refused(["--base", str(init), "--trained", str(tmp_path / "unknown.safetensors"), "--out", str(out)],
            "control_model.nope.weight", "do not exist")
    key = "control_model.zero_convs.0.0.weight"
    save_state_dict({key: torch.zeros(1, 2, 3)}, tmp_path / "shape.safetensors")
    refused(["--base", str(init), "--trained", str(tmp_path / "shape.safetensors"), "--out", str(out)],
            key, "[1, 2, 3]")
    # A base that is not a full checkpoint does not load strictly into the model.
    partial = {k: v for k, v in load_state_dict(init).items() if not k.startswith("first_stage_model.")}
    save_state_dict(partial, tmp_path / "partial.safetensors")
    refused(["--base", str(tmp_path / "partial.safetensors"), "--trained", str(tmp_path / "partial.safetensors"),
             "--out", str(out), "--config", str(TINY)], "missing", "first_stage_model.")
    refused(["--base", str(tmp_path / "partial.safetensors"), "--trained", str(tmp_path / "partial.safetensors"),
             "--out", str(out)], "no config", "--config")


def test_original_checkpoint_layouts_load_without_conversion(tiny, tmp_path):
    """What the original code writes: a Lightning checkpoint with the state dict nested, or a bare dict, with or
    without position_ids, possibly with the EMA copy."""
    root, _ = tiny
    state = load_state_dict(root / "init.safetensors")
    bare = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    torch.save({"state_dict": {**state, "model_ema.decay": torch.tensor(0.99)}, "epoch": 7, "global_step": 3000},
               tmp_path / "lightning.ckpt")
    torch.save(bare, tmp_path / "merged_pytorch_model.pth")
    for name in ("lightning.ckpt", "merged_pytorch_model.pth"):
        model = build_model(load_config(TINY).model)
        load_weights(model, tmp_path / name)
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
