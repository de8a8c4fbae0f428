"""Sampling image-mask pairs from other inputs: random (augmented) masks, a prompt JSONL without targets and
``--keep-size``, all-black masks, bad inputs with one-line errors, ``--config`` against the checkpoint's own."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from ldm.checkpoint import save_state_dict

import cv2
import numpy as np
import pytest
import torch
from _inference_env import (  # noqa: F401  (fixtures: env, model, base_out)
    NAMES,
    STEPS,
    TINY,
    base_out,
    cli,
    env,
    error_lines,
    files,
    manifest_lines,
    model,
    run_cli,
)

from siamese.config import checkpoint_metadata, load_config
from siamese.data.masks import MaskAugment, read_mask
from siamese.data.pairs import MANIFEST_NAME, read_manifest
from siamese.factory import build_model
from siamese.sampling import (
    mask_rng,
)
from tools.inference import main, resolve_config


# -- modes and inputs -----------------------------------------------------------------------------------------------
def test_random_mode_saves_the_augmented_masks(env: dict[str, Path], base_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(cli(env, out, "--mask-mode", "random", "--batch-size", "3")) == 0
    records = read_manifest(out / MANIFEST_NAME)
    changed = 0
    for name in NAMES:
        saved = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(saved).tolist()) <= {0, 255}
        source = read_mask(out / records[name]["source"])
        expected = MaskAugment().apply(source, mask_rng(records[name]["seed"]))
        np.testing.assert_array_equal(saved, expected * 255)
        changed += not np.array_equal(saved, source * 255)
    assert changed >= 4
    assert records[NAMES[0]]["mask_mode"] == "random" and records[NAMES[0]]["augment"]["shift_frac"] == 0.1
    assert files(out)["images/synthetic_000000_k0.png"] != files(base_out)["images/synthetic_000000_k0.png"]


def test_prompt_jsonl_without_targets_and_keep_size(env: dict[str, Path], tmp_path: Path) -> None:
    odd = cv2.resize(read_mask(env["masks"] / "synthetic_000000.png") * 255, (96, 80), interpolation=cv2.INTER_NEAREST)
    cv2.imwrite(str(tmp_path / "odd.png"), odd)
    prompt_file = tmp_path / "prompt.json"
    prompt_file.write_text(json.dumps({"source": "odd.png", "prompt": "a polyp"}) + "\n\n" +
                           json.dumps({"source": str(env["masks"] / "synthetic_000001.png"), "prompt": "a lesion"}))
    out = tmp_path / "out"
    assert main(cli(env, out, "--keep-size", "--n-per-mask", "1", masks=prompt_file)) == 0
    records = read_manifest(out / MANIFEST_NAME)
    assert {n: r["prompt"] for n, r in records.items()} == {"odd_k0": "a polyp", "synthetic_000001_k0": "a lesion"}
    assert cv2.imread(str(out / "images" / "odd_k0.png")).shape == (80, 96, 3)
    np.testing.assert_array_equal(cv2.imread(str(out / "masks" / "odd_k0.png"), cv2.IMREAD_UNCHANGED), odd)


def test_all_black_mask_warns_and_still_samples(env: dict[str, Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "masks").mkdir()
    cv2.imwrite(str(tmp_path / "masks" / "empty.png"), np.zeros((64, 64), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert main(cli(env, tmp_path / "out", "--n-per-mask", "1", "--steps", "1", masks=tmp_path / "masks")) == 0
    assert any("all black" in r.getMessage() and "empty.png" in r.getMessage() for r in caplog.records)
    assert not cv2.imread(str(tmp_path / "out" / "masks" / "empty_k0.png"), cv2.IMREAD_UNCHANGED).any()


def _bad_inputs(env: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], int, str]]:
    (tmp / "empty").mkdir()
    (tmp / "garbage").mkdir()
    (tmp / "garbage" / "bad.png").write_bytes(b"not a png")
    (tmp / "dup").mkdir()
    for name in ("a.png", "a.bmp"):
        shutil.copy(env["masks"] / "synthetic_000000.png", tmp / "dup" / name)
    (tmp / "prompt.json").write_text(json.dumps({"source": str(env["masks"] / "synthetic_000000.png"),
                                                 "prompt": "p"}) + "\n{broken\n")
    state = load_config(TINY)
    torch.manual_seed(0)
    sd = build_model(state.model).state_dict()
    del sd["control_model.input_hint_block.0.initial_conv.weight"]
    save_state_dict(sd, tmp / "partial.safetensors", metadata=checkpoint_metadata(state, "merged"))
    save_state_dict({"x": torch.zeros(1)}, tmp / "bare.safetensors")
    out = str(tmp / "out")
    base = ["--ckpt", str(env["ckpt"]), "--out", out, "--steps", "1", "--no-progress"]
    return {
        "empty folder": (base + ["--masks", str(tmp / "empty")], 1, "no mask images"),
        "unreadable mask": (base + ["--masks", str(tmp / "garbage")], 1, "bad.png"),
        "same stem": (base + ["--masks", str(tmp / "dup")], 1, "share the name 'a'"),
        "bad JSONL line": (base + ["--masks", str(tmp / "prompt.json")], 1, "prompt.json:2"),
        "missing keys": (["--ckpt", str(tmp / "partial.safetensors"), "--masks", str(env["masks"]), "--out", out,
                          "--steps", "1", "--limit", "1", "--prompt", "p"], 1,
                         "partial.safetensors: cannot load state dict into ControlLDM: 1 missing (control_model."),
        "no config": (["--ckpt", str(tmp / "bare.safetensors"), "--masks", str(env["masks"]), "--out", out], 2,
                      "pass --config"),
        "missing checkpoint": (["--ckpt", str(tmp / "nope.safetensors"), "--masks", str(env["masks"]), "--out", out],
                               1, "nope.safetensors"),
        "fp16 on cpu": (base + ["--masks", str(env["masks"]), "--device", "cpu", "--precision", "fp16"], 1, "fp16"),
        "bad shard": (base + ["--masks", str(env["masks"]), "--shard", "2/2"], 1, "--shard"),
        "eta with a solver": (base + ["--masks", str(env["masks"]), "--sampler", "unipc", "--eta", "0.5"], 1,
                              "--sampler unipc is deterministic: it needs --eta 0"),
        "negative mask guidance": (base + ["--masks", str(env["masks"]), "--cfg-mask", "-1"], 1, "--cfg-mask >= 0"),
        "too many solver steps": (base[:-3] + ["--steps", "1000", "--masks", str(env["masks"]), "--sampler",
                                               "dpmpp_2m"], 1, "--steps must be in [1, 999] for --sampler dpmpp_2m"),
    }


def test_bad_inputs_give_one_line_errors(env: dict[str, Path], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    for what, (argv, code, needle) in _bad_inputs(env, tmp_path).items():
        caplog.clear()
        assert main(argv) == code, what
        messages = error_lines(caplog)
        assert len(messages) == 1 and needle in messages[0] and "\n" not in messages[0], (what, messages)
    assert not list((tmp_path / "out" / "images").glob("*.png"))


def test_config_flag_wins_over_the_checkpoint_with_a_warning(env: dict[str, Path],
                                                             caplog: pytest.LogCaptureFixture) -> None:
    stored = resolve_config(None, [], env["ckpt"])  # from the metadata: the tiny config, its data's prompt resolved
    assert stored == replace(load_config(TINY), sample=replace(load_config(TINY).sample, prompt=stored.sample.prompt))
    assert stored.sample.prompt is not None
    with caplog.at_level(logging.WARNING):
        cfg = resolve_config(TINY, ["sample.steps=7"], env["ckpt"])
    assert cfg.sample.steps == 7
    assert any("differs from the config stored" in r.getMessage() for r in caplog.records)
    assert resolve_config(None, ["sample.steps=5"], env["ckpt"]).sample.steps == 5
