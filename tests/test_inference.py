"""Tests for sampling image-mask pairs (siamese.sampling, siamese.pairs_io, tools/inference.py) at the tiny config.

A random-weight tiny checkpoint carrying its config in the metadata (as tool_merge_control.py writes merged ones)
and a few generated lesion masks; few DDIM steps. One CLI run is shared by the tests that only read its output.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from pathlib import Path

from ldm.checkpoint import save_state_dict
from ldm.sampler import cfg_denoiser, ddim_sample
from ldm.solvers import dpmpp_2m_sample

import cv2
import numpy as np
import pytest
import torch

from cldm.model import ControlLDM
from siamese.config import checkpoint_metadata, load_config
from siamese.data import write_synthetic_dataset
from siamese.factory import build_model, load_weights
from siamese.masks import MaskAugment, read_mask
from siamese.pairs_io import MANIFEST_NAME, PairWriter, read_manifest
from siamese.sampling import (
    MaskSource,
    SampledPair,
    WorkItem,
    collect_masks,
    make_items,
    mask_rng,
    parse_shard,
    sample_pairs,
    sample_seed,
    shard_items,
)
from tools.inference import build_parser, main, resolve_config, run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
STEPS = "3"
NAMES = [f"synthetic_{i:06d}_k{k}" for k in range(2) for i in range(3)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference")
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # a fresh model has zero convolutions (ControlNet) and a zero UNet output: ε ≡ 0,
        for param in model.parameters():  # hint and prompt would change nothing. Give them weights.
            if not param.any():
                param.normal_(0.0, 0.05)
    ckpt = root / "merged.safetensors"
    save_state_dict(model.state_dict(), ckpt, metadata=checkpoint_metadata(cfg, "merged"))
    write_synthetic_dataset(root / "data", 3, 64)
    return {"root": root, "ckpt": ckpt, "masks": root / "data" / "masks"}


@pytest.fixture(scope="module")
def model(env: dict[str, Path]) -> ControlLDM:
    net = build_model(load_config(TINY).model)
    load_weights(net, env["ckpt"])
    return net.eval()


def cli(env: dict[str, Path], out: Path, *extra: str, masks: Path | None = None) -> list[str]:
    return ["--ckpt", str(env["ckpt"]), "--masks", str(masks or env["masks"]), "--out", str(out), "--steps", STEPS,
            "--n-per-mask", "2", "--no-progress", *extra]


def run_cli(argv: list[str]) -> dict[str, float]:
    return run(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def base_out(env: dict[str, Path]) -> Path:
    out = env["root"] / "base"
    assert main(cli(env, out, "--batch-size", "3", "--grid")) == 0
    return out


def files(out: Path) -> dict[str, bytes]:
    return {f"{sub}/{p.name}": p.read_bytes() for sub in ("images", "masks") for p in sorted((out / sub).glob("*.png"))}


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


# -- outputs --------------------------------------------------------------------------------------------------------
def test_pairs_written_with_matching_names_and_binary_masks(env: dict[str, Path], base_out: Path) -> None:
    for sub in ("images", "masks"):
        assert sorted(p.stem for p in (base_out / sub).glob("*.png")) == sorted(NAMES)
    for name in NAMES:
        image = cv2.imread(str(base_out / "images" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(base_out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8 and image.std() > 0
        assert mask.shape == (64, 64) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) == {0, 255}
        source = read_mask(env["masks"] / f"{name.rsplit('_k', 1)[0]}.png")
        np.testing.assert_array_equal(mask, source * 255)  # real mode at the model size: the mask as given
    lines = manifest_lines(base_out)
    assert sorted(r["name"] for r in lines) == sorted(NAMES)
    first = lines[0]
    for key in ("image", "mask", "source", "prompt", "seed", "k", "steps", "cfg", "eta", "mask_mode", "ckpt_sha256",
                "config_hash"):
        assert key in first
    assert (first["steps"], first["cfg"], first["eta"], first["mask_mode"]) == (3, 9.0, 0.0, "real")
    assert len(first["ckpt_sha256"]) == 64 and (base_out / first["image"]).is_file()
    grid = cv2.imread(str(base_out / "grid.png"))
    assert grid.shape == (2 * 64, 4 * 2 * 64, 3)  # 6 pairs, 4 per row → 2 rows of (mask | image) tiles


def close(a: np.ndarray, b: np.ndarray, tol: int = 3) -> bool:
    """Equal up to float rounding of batched kernels: a gray level or two on a few pixels."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(diff.max()) <= tol and float((diff > 0).mean()) < 0.05


def png(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_same_seed_same_files(env: dict[str, Path], base_out: Path, tmp_path: Path) -> None:
    base = files(base_out)
    assert main(cli(env, tmp_path / "limit", "--batch-size", "3", "--limit", "4")) == 0
    limited = files(tmp_path / "limit")
    assert limited == {k: base[k] for k in limited} and len(limited) == 8  # same seed: byte-identical pairs
    images = {name: base[f"images/{name}.png"] for name in NAMES}
    assert images["synthetic_000000_k0"] != images["synthetic_000000_k1"]  # another index → another image
    assert len(set(images.values())) == len(NAMES)
    assert main(cli(env, tmp_path / "b1", "--batch-size", "1")) == 0
    other = files(tmp_path / "b1")
    for key in base:  # another batch size: the same samples, up to float rounding
        assert close(png(other[key]), png(base[key])), key
    assert main(cli(env, tmp_path / "s1", "--limit", "1", "--seed", "1", "--batch-size", "1")) == 0
    new_seed = png(files(tmp_path / "s1")["images/synthetic_000000_k0.png"])
    assert not close(new_seed, png(images["synthetic_000000_k0"]), tol=30)


def test_seeds_are_stable_and_limit_is_index_major(env: dict[str, Path]) -> None:
    assert sample_seed(0, "a", 0) == sample_seed(0, "a", 0) == 3019835601215111317
    assert len({sample_seed(0, "a", 0), sample_seed(0, "a", 1), sample_seed(0, "b", 0), sample_seed(1, "a", 0)}) == 4
    sources = collect_masks(env["masks"], default_prompt="p")
    items = make_items(sources, 2, seed=0, limit=4)
    assert [item.name for item in items] == NAMES[:4]
    assert [item.seed for item in items] == [sample_seed(0, item.source.name, item.k) for item in items]


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_noise_is_per_sample(env: dict[str, Path], model: ControlLDM, eta: float) -> None:
    a, b, c = make_items(collect_masks(env["masks"], default_prompt="p"), 1, seed=3)
    kwargs = {"hint_size": 64, "steps": 2, "eta": eta, "batch_size": 3}
    first = [p.image for p in sample_pairs(model, [a, b, c], **kwargs)]
    second = [p.image for p in sample_pairs(model, [a, c, b], **kwargs)]
    np.testing.assert_array_equal(first[0], second[0])  # same row: other rows' content and noise do not matter
    assert close(first[1], second[2]) and close(first[2], second[1])  # moved rows: same noise, rounding apart
    alone = next(iter(sample_pairs(model, [c], **{**kwargs, "batch_size": 1})))
    assert close(alone.image, first[2])
    if eta > 0:
        deterministic = next(iter(sample_pairs(model, [a], **{**kwargs, "eta": 0.0})))
        assert not close(deterministic.image, first[0], tol=30)


def _hint(item) -> torch.Tensor:
    return torch.from_numpy(read_mask(item.source.path).astype(np.float32))[None, None].repeat(1, 3, 1, 1)


def _uint8(images: torch.Tensor) -> np.ndarray:
    return ((images[0] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_cfg_scale_one_is_the_conditional_branch(env: dict[str, Path], model: ControlLDM) -> None:
    items = make_items(collect_masks(env["masks"], default_prompt="A photo of a polyp."), 1, seed=5)[:2]
    kwargs = {"hint_size": 64, "steps": 3, "batch_size": 1}  # batch 1: bit-comparable with the single runs below
    got = [p.image for p in sample_pairs(model, items, cfg_scale=1.0, **kwargs)]
    # The conditional branch written out: ε(z, τ, h) from the model, DDIM from each item's own seed, decode.
    for item, image in zip(items, got):
        hint, context = _hint(item), model.encode_prompts([item.source.prompt])

        def eps(x: torch.Tensor, t: torch.Tensor, c: object, hint=hint, context=context) -> torch.Tensor:
            return model.eps(x, t, context, hint)

        z = ddim_sample(eps, (1, 4, 8, 8), None, model.schedule, steps=3,
                        generator=torch.Generator().manual_seed(item.seed))
        np.testing.assert_array_equal(image, _uint8(model.decode_latents(z)))
    guided = next(iter(sample_pairs(model, items[:1], cfg_scale=9.0, **kwargs)))
    assert not np.array_equal(guided.image, got[0])
    # With guidance, a pair is what ControlLDM.sample gives for its mask, prompt and seed.
    reference = model.sample(_hint(items[0]), [items[0].source.prompt], steps=3, cfg_scale=9.0,
                             generator=torch.Generator().manual_seed(items[0].seed))
    np.testing.assert_array_equal(guided.image, _uint8(reference))


def test_cfg_mask_none_keeps_the_old_outputs_and_cfg_mask_is_the_dual_formula(env: dict[str, Path],
                                                                              model: ControlLDM) -> None:
    item = make_items(collect_masks(env["masks"], default_prompt="A photo of a polyp."), 1, seed=5)[0]
    hint, prompts = _hint(item), [item.source.prompt]
    context, empty = model.encode_prompts(prompts), model.encode_prompts([""])

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(item.seed)

    # The protocol before cfg_mask existed, written out: CFG on the text (same hint) + DDIM + decode.
    old = cfg_denoiser(model.denoise, {"context": empty, "hint": hint}, 9.0)
    z = ddim_sample(old, (1, 4, 8, 8), {"context": context, "hint": hint}, model.schedule, steps=3,
                    generator=generator())
    for kwargs in ({}, {"cfg_mask": None, "sampler": "ddim"}):
        got = model.sample(hint, prompts, steps=3, cfg_scale=9.0, generator=generator(), **kwargs)
        assert torch.equal(got, model.decode_latents(z))

    def dual(x: torch.Tensor, t: torch.Tensor, c: object) -> torch.Tensor:  # Brooks et al. 2023, eq. 3
        e_0 = model.eps(x, t, empty, torch.zeros_like(hint))
        e_m, e_c = model.eps(x, t, empty, hint), model.eps(x, t, context, hint)
        return e_0 + 2.0 * (e_m - e_0) + 9.0 * (e_c - e_m)

    z = dpmpp_2m_sample(dual, (1, 4, 8, 8), None, model.schedule, steps=3, generator=generator())
    got = model.sample(hint, prompts, steps=3, cfg_scale=9.0, generator=generator(), sampler="dpmpp_2m",
                       cfg_mask=2.0)
    torch.testing.assert_close(got, model.decode_latents(z), rtol=0, atol=1e-4)
    plain = model.sample(hint, prompts, steps=3, cfg_scale=9.0, generator=generator(), sampler="dpmpp_2m")
    assert (got - plain).abs().max() > 1e-2


def test_cli_with_a_solver_and_mask_guidance(env: dict[str, Path], base_out: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(cli(env, out, "--batch-size", "3", "--sampler", "dpmpp_2m", "--cfg-mask", "2")) == 0
    assert sorted(p.stem for p in (out / "images").glob("*.png")) == sorted(NAMES)
    records = manifest_lines(out)
    assert {(r["sampler"], r["cfg_mask"]) for r in records} == {("dpmpp_2m", 2.0)}
    assert {(r["sampler"], r["cfg_mask"]) for r in manifest_lines(base_out)} == {("ddim", None)}
    assert files(out) != files(base_out)
    # Resuming with another sampler or mask guidance is refused like any other setting.
    for extra, needle in ((["--sampler", "unipc", "--cfg-mask", "2"], "sampler='dpmpp_2m'"),
                          (["--sampler", "dpmpp_2m", "--cfg-mask", "none"], "cfg_mask=2.0")):
        caplog.clear()
        assert main(cli(env, out, "--batch-size", "3", *extra)) == 1
        (message,) = error_lines(caplog)
        assert needle in message and "\n" not in message
    assert run_cli(cli(env, out, "--batch-size", "3", "--sampler", "dpmpp_2m", "--cfg-mask", "2"))["generated"] == 0
    # The config's sample.sampler / sample.cfg_mask are the defaults of the flags.
    other = tmp_path / "from_config"
    assert run_cli(cli(env, other, "--limit", "1", "--config", str(TINY), "sample.sampler=unipc",
                       "sample.cfg_mask=1.5"))["generated"] == 1
    assert {(r["sampler"], r["cfg_mask"]) for r in manifest_lines(other)} == {("unipc", 1.5)}


# -- resume and shards ----------------------------------------------------------------------------------------------
def test_resume_regenerates_exactly_the_incomplete_pairs(env: dict[str, Path], base_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(base_out, out)
    (out / "images" / "synthetic_000001_k1.png").unlink()  # a crash before its image was renamed into place
    lines = (out / MANIFEST_NAME).read_text().splitlines()
    (out / MANIFEST_NAME).write_text("\n".join(x for x in lines if '"synthetic_000002_k0"' not in x) + "\n")
    untouched = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    summary = run_cli(cli(env, out, "--batch-size", "3"))
    assert (summary["generated"], summary["skipped"]) == (2, 4)
    assert files(out) == files(base_out)
    changed = {p.name for p, t in untouched.items() if p.stat().st_mtime_ns != t}
    assert changed == {"synthetic_000002_k0.png"}  # batch-mates were recomputed, not rewritten
    names = [r["name"] for r in manifest_lines(out)]
    assert sorted(names) == sorted(NAMES)  # every pair once: no duplicate line for the one that kept its line
    assert run_cli(cli(env, out))["generated"] == 0


def test_resume_refuses_other_settings(env: dict[str, Path], base_out: Path, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    shutil.copytree(base_out, out)
    assert main(cli(env, out)[:-1] + ["--no-progress", "--cfg", "7"]) == 1
    (message,) = error_lines(caplog)
    assert "cfg=9.0" in message and "cfg=7.0" in message and "\n" not in message


def test_resume_accepts_a_manifest_from_before_the_solvers(env: dict[str, Path], base_out: Path,
                                                          tmp_path: Path) -> None:
    """Manifest lines written before ``sampler`` / ``cfg_mask`` existed were DDIM without mask guidance."""
    out = tmp_path / "out"
    shutil.copytree(base_out, out)
    old = [json.loads(x) for x in (out / MANIFEST_NAME).read_text().splitlines()]
    for record in old:
        del record["sampler"], record["cfg_mask"]
    (out / MANIFEST_NAME).write_text("".join(json.dumps(r) + "\n" for r in old))
    assert run_cli(cli(env, out, "--batch-size", "3"))["generated"] == 0
    assert main(cli(env, out, "--batch-size", "3", "--sampler", "unipc")) == 1


def test_shards_are_disjoint_and_cover_everything(env: dict[str, Path], base_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    counts = [run_cli(cli(env, out, "--shard", f"{i}/2", "--batch-size", "3"))["generated"] for i in range(2)]
    assert counts == [3, 3]
    assert files(out) == files(base_out)  # same pairs as the unsharded run
    assert sorted(r["name"] for r in manifest_lines(out)) == sorted(NAMES)
    assert main(cli(env, out, "--shard", "0/3", "--batch-size", "3")) == 1  # another split would overlap / leave gaps
    items = make_items(collect_masks(env["masks"], default_prompt="p"), 3, seed=0, limit=8)
    shards = [shard_items(items, i, 3) for i in range(3)]
    assert sorted(len(s) for s in shards) == [2, 3, 3]
    assert sorted(x.name for s in shards for x in s) == sorted(x.name for x in items)
    shards = [shard_items(items, i, 2, batch_size=3) for i in range(2)]  # whole batches: [0:3] + [6:8], [3:6]
    assert [[items.index(x) for x in s] for s in shards] == [[0, 1, 2, 6, 7], [3, 4, 5]]
    assert parse_shard(" 1/4 ") == (1, 4)
    for bad in ("4/4", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def _write_pairs(out: Path, names: list[str]) -> None:
    writer = PairWriter(out, {"steps": 1})
    rgb, mask01 = np.zeros((4, 4, 3), np.uint8), np.eye(4, dtype=np.uint8)
    for name in names:
        item = WorkItem(MaskSource(name, Path(f"{name}.png"), "p" * 300), 0, 1)
        writer.write(SampledPair(item, rgb, mask01, mask01))


def test_manifest_lines_never_interleave_or_repeat_across_processes(tmp_path: Path) -> None:
    # Two processes with overlapping work (as misconfigured shards would have): one whole line per pair.
    names = [f"m{i:03d}" for i in range(120)]
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_write_pairs, args=(tmp_path, part)) for part in (names[:80], names[40:][::-1])]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    assert sorted(json.loads(line)["name"] for line in lines) == sorted(n + "_k0" for n in names)
    assert not list(tmp_path.glob("*/.*tmp*"))  # no temporary files left behind


# -- modes and inputs -----------------------------------------------------------------------------------------------
def test_random_mode_saves_the_augmented_masks(env: dict[str, Path], base_out: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(cli(env, out, "--mask-mode", "random", "--batch-size", "3")) == 0
    records = read_manifest(out / MANIFEST_NAME)
    changed = 0
    for name in NAMES:
        saved = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(saved).tolist()) <= {0, 255}
        source = read_mask(Path(records[name]["source"]))
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
                          "--steps", "1", "--limit", "1"], 1,
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
    assert resolve_config(None, [], env["ckpt"]) == load_config(TINY)  # from the metadata
    with caplog.at_level(logging.WARNING):
        cfg = resolve_config(TINY, ["sample.steps=7"], env["ckpt"])
    assert cfg.sample.steps == 7
    assert any("differs from the config stored" in r.getMessage() for r in caplog.records)
    assert resolve_config(None, ["sample.steps=5"], env["ckpt"]).sample.steps == 5
