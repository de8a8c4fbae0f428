"""Tests for sampling image-mask pairs (siamese.sampling, siamese.data.pairs, tools/inference.py) at the tiny config.

The shared set-up (a tiny checkpoint, masks, one CLI run) is in ``_inference_env.py``; inputs and errors are in
``test_inference_inputs.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
from pathlib import Path

from ldm.sampler import cfg_denoiser, ddim_sample
from ldm.solvers import dpmpp_2m_sample

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

from cldm.model import ControlLDM
from siamese.data.images import write_png
from siamese.data.masks import mask_to_png, read_mask
from siamese.data.pairs import MANIFEST_NAME, PairWriter
from siamese.sampling import (
    MaskSource,
    SampledPair,
    WorkItem,
    collect_masks,
    make_items,
    parse_shard,
    sample_pairs,
    sample_seed,
    shard_items,
)
from tools.inference import main


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

    # The protocol before cfg_mask existed, written out: CFG on the text (same hint) + DDIM + decode, the hint
    # encoded once as ControlLDM.sample does (per step instead: tests/test_hint_cache.py).
    encoded = model.hint_condition(hint)
    old = cfg_denoiser(model.denoise, {"context": empty, **encoded}, 9.0)
    z = ddim_sample(old, (1, 4, 8, 8), {"context": context, **encoded}, model.schedule, steps=3,
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
                       "sample.cfg_mask=1.5", "sample.prompt=A photo of a polyp."))["generated"] == 1
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
    source = out.parent / f"{out.name}_source.png"  # the mask a manifest line names (by path and digest)
    if not source.is_file():
        write_png(source, mask_to_png(mask01))
    for name in names:
        item = WorkItem(MaskSource(name, source, "p" * 300), 0, 1)
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
