"""``tutorial_inference.py``: sample synthetic image-mask pairs from a merged Siamese-Diffusion checkpoint.

    python tutorial_inference.py --ckpt merged.safetensors --masks data/polyps/masks --out synth/
    python tutorial_inference.py --config configs/siamese_sd15.yaml --ckpt merged.safetensors \\
        --masks data/polyps/prompt.json --out synth/ --n-per-mask 4 --mask-mode random --batch-size 8
    python tutorial_inference.py ... --shard 0/4 --device cuda:0     # process 0 of 4 (e.g. one per GPU)

Mask-only sampling (the Mask-Diffusion branch): DDIM with classifier-free guidance on the text, the unconditional
input being the empty prompt with the same mask (--sampler dpmpp_2m / unipc: faster ODE solvers; --cfg-mask S:
separate guidance of the mask, InstructPix2Pix-style, a third branch with an all-zero hint). Writes
OUT/images/NAME_kK.png, OUT/masks/NAME_kK.png (0/255), OUT/manifest.jsonl (each pair's source mask by a path
relative to OUT and by digest) and OUT/provenance.json (the checkpoint's, the masks' and the backgrounds' records of
what they were made from, which tools.evaluate checks against the test split); re-running the same command skips
complete pairs (resume), and n processes with --shard i/n can share one OUT. The config comes from --config or,
when omitted, from the checkpoint's metadata (merged checkpoints written by tool_merge_control.py carry it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.fileio import file_sha256
from ldm.progress import progress
from ldm.settings import DEFAULT_REGION, REGION_HELP, SAMPLERS, parse_region

from cldm.settings import HINT_DOWNSAMPLE
from siamese.config import (
    METADATA_CONFIG,
    METADATA_KIND,
    ConfigError,
    ExperimentConfig,
    checkpoint_provenance,
    config_from_metadata,
    config_hash,
    load_config,
)
from siamese.config.schema import MASK_MODES, PRECISIONS
from siamese.data.masks import MaskAugment
from siamese.data.pairs import IMAGES_DIR, MASKS_DIR, PairWriter, write_grid
from siamese.data.provenance import Provenance, dataset_record, read_provenance
from tools._cli import add_common_flags, make_parser
from tools._cli import run as run_cli

if TYPE_CHECKING:
    import torch

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.inference")


def resolve_config(config: Path | None, overrides: list[str], ckpt: Path) -> ExperimentConfig:
    """--config (+ overrides) if given, else the config in the checkpoint's metadata; warns when both disagree."""
    from ldm.checkpoint import read_metadata

    meta = read_metadata(ckpt)  # FileNotFoundError (one line) for a missing checkpoint
    embedded = config_from_metadata(meta, str(ckpt))
    if config is None:
        if embedded is None:
            raise ConfigError(f"no --config given and {ckpt} carries no config in its metadata ({METADATA_CONFIG}): "
                              f"pass --config")
        return load_config(None, overrides, text=meta[METADATA_CONFIG], where=f"{ckpt} (metadata)")
    cfg = load_config(config, overrides)
    if embedded is not None and config_hash(embedded) != config_hash(cfg):
        logger.warning("--config %s differs from the config stored in %s (hash %s vs %s); using --config", config,
                       ckpt, config_hash(cfg), config_hash(embedded))
    return cfg


def check_shard_layout(writer: PairWriter, shards: int, batch_size: int) -> None:
    """Shards split whole batches of the work list: processes sharing an OUT need the same n and --batch-size."""
    if shards == 1:
        return  # a single process covers every pair; it may finish what any earlier layout left
    for record in writer.recorded.values():
        old = (record.get("shards", 1), record.get("batch_size"))
        if old[0] > 1 and old != (shards, batch_size):
            raise ValueError(f"{writer.manifest_path}: pair {record['name']} comes from --shard i/{old[0]} with "
                             f"--batch-size {old[1]}; all shards of one OUT need the same n and --batch-size "
                             f"(this run: {shards}, {batch_size})")


def default_device() -> torch.device:
    import torch

    api = getattr(torch, "accelerator", None)  # torch >= 2.6; older releases fall back to the CPU
    accelerator = api.current_accelerator() if api is not None and api.is_available() else None
    return torch.device(accelerator) if accelerator is not None else torch.device("cpu")


def _folder_provenance(path: Path, subfolder: str) -> Provenance | None:
    """The ``provenance.json`` records of a folder: the one given, a file's own folder (prompt.json), or also the
    folder above when the path is its ``masks/`` / ``images/`` subfolder (``tools.maskgen sample OUT`` → OUT/masks)."""
    path = Path(path)
    folders = (path.parent,) if path.is_file() else (path, path.parent) if path.name == subfolder else (path,)
    found = [p for p in map(read_provenance, folders) if p is not None]
    return found[0].merge(*found[1:]) if found else None


def sampling_provenance(ckpt: Path, masks: Path, backgrounds: Path | None) -> Provenance:
    """What a pairs folder is made from (its ``provenance.json``): the checkpoint's records
    (``checkpoint_provenance``), those of the masks' folder (a mask generator's output carries its provenance.json)
    and those of the background library (its provenance.json, e.g. ``tools.repair_backgrounds``', else a ``content``
    record of its image files by digest)."""
    from siamese.sampling import collect_backgrounds

    found = checkpoint_provenance(ckpt).merge(_folder_provenance(masks, MASKS_DIR))
    if backgrounds is not None:
        library = _folder_provenance(backgrounds, IMAGES_DIR)
        found = found.merge(library if library is not None else Provenance((
            dataset_record(f"backgrounds {backgrounds}", backgrounds, collect_backgrounds(backgrounds),
                           role="content"),)))
    return found


def run(args: argparse.Namespace) -> dict[str, float]:
    """The command behind main(); returns the summary (generated, skipped, sampling seconds)."""
    from ldm.checkpoint import CheckpointKeyError, read_metadata

    import torch

    from siamese.factory import build_latent_diffusion, build_model, load_weights
    from siamese.sampling import (
        autocast_context,
        batches,
        check_masks,
        collect_backgrounds,
        collect_masks,
        make_items,
        parse_shard,
        sample_pairs,
        shard_items,
    )

    cfg = resolve_config(args.config, args.overrides, args.ckpt)
    steps = args.steps if args.steps is not None else cfg.sample.steps
    cfg_scale = args.cfg if args.cfg is not None else cfg.sample.cfg_scale
    eta = args.eta if args.eta is not None else cfg.sample.eta
    sampler = args.sampler if args.sampler is not None else cfg.sample.sampler
    cfg_mask = cfg.sample.cfg_mask if args.cfg_mask is None else None if args.cfg_mask == "none" else args.cfg_mask
    max_steps = cfg.model.schedule.timesteps - (sampler != "ddim")  # the solvers end on t = 0 after their grid
    if not 1 <= steps <= max_steps:
        raise ValueError(f"--steps must be in [1, {max_steps}] for --sampler {sampler}, got {steps}")
    if eta < 0 or cfg_scale < 0 or args.batch_size < 1:
        raise ValueError(f"need --eta >= 0, --cfg >= 0, --batch-size >= 1 (got {eta}, {cfg_scale}, {args.batch_size})")
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--sampler {sampler} is deterministic: it needs --eta 0 (got {eta}); eta > 0 needs ddim")
    if args.erode < 0:
        raise ValueError(f"need --erode >= 0 pixels, got {args.erode}")
    if cfg_mask is not None and cfg_mask < 0:
        raise ValueError(f"need --cfg-mask >= 0 (or none), got {cfg_mask}")
    if args.region is not None and not args.background:
        raise ValueError(f"--region {args.region} chooses what background-preserving generation regenerates: it "
                         "acts only with --background DIR")
    region = str(parse_region(args.region if args.region is not None else DEFAULT_REGION))
    device = torch.device(args.device) if args.device else default_device()
    autocast_context(device, args.precision)  # refuse an unsupported precision before any work
    augment = MaskAugment(flip_p=args.flip_p, vflip_p=args.vflip_p, scale_range=tuple(args.scale_range),
                          shift_frac=args.shift_frac)

    sources = collect_masks(args.masks, default_prompt=cfg.sample.prompt, prompt_override=args.prompt)
    if args.prompt is None and Path(args.masks).is_dir():
        logger.info("masks from a folder: prompt %r (the model's sample.prompt: its training data's prompt unless "
                    "its config set one; --prompt overrides)", cfg.sample.prompt)
    every = make_items(sources, args.n_per_mask, args.seed, args.limit)
    backgrounds = collect_backgrounds(args.background) if args.background else None
    shard = parse_shard(args.shard) if args.shard else (0, 1)
    items = shard_items(every, *shard, batch_size=args.batch_size)
    run_info = {"base_seed": args.seed, "steps": steps, "cfg": float(cfg_scale), "eta": float(eta), "sampler": sampler,
                "cfg_mask": None if cfg_mask is None else float(cfg_mask), "erode": args.erode,
                "backgrounds": str(args.background.resolve()) if args.background else None, "region": region,
                "erode_kernel": args.erode_kernel,
                "mask_mode": args.mask_mode, "augment": vars(augment) if args.mask_mode == "random" else None,
                "precision": args.precision, "ckpt_sha256": "", "config_hash": config_hash(cfg)}
    if args.background:  # the outside starts on the background's trajectory (lines without this key: pure noise)
        run_info["background_start"] = "first-step"
    base_model = read_metadata(args.ckpt).get(METADATA_KIND) == "base"
    # Image pixels per latent cell of the saved pairs (before --keep-size): what ldm.regions.image_region needs.
    factor = cfg.model.first_stage.downsample if base_model else HINT_DOWNSAMPLE
    writer = PairWriter(args.out, run_info, keep_size=args.keep_size,
                        info={"batch_size": args.batch_size, "shards": shard[1], "latent_factor": factor},
                        provenance=sampling_provenance(args.ckpt, args.masks, args.background))
    check_shard_layout(writer, shard[1], args.batch_size)
    todo = [item for item in items if not writer.is_complete(item.name)]
    # Whole batches are re-run (complete pairs in them are recomputed, not rewritten) so each pair keeps its batch
    # and position: a regenerated file is then bit-identical to the one an uninterrupted run writes.
    todo_names = {item.name for item in todo}
    rerun = [item for batch in batches(items, args.batch_size) if todo_names & {i.name for i in batch}
             for item in batch]
    limited = f", {len(every)} after --limit" if len(every) < len(sources) * args.n_per_mask else ""
    logger.info("%d masks × %d = %d pairs%s; shard %d/%d: %d pairs, %d already complete, %d to generate",
                len(sources), args.n_per_mask, len(sources) * args.n_per_mask, limited, *shard, len(items),
                len(items) - len(todo), len(todo))
    if base_model and not args.background:
        raise ValueError(f"{args.ckpt} is a base model without a ControlNet (tools.pretrain): it follows a mask only "
                         "through background-preserving generation; pass --background DIR")
    if base_model and cfg_mask is not None:
        raise ValueError(f"--cfg-mask guides the ControlNet's mask hint; {args.ckpt} is a base model without one")
    check_masks(todo)
    logger.info("hashing %s", args.ckpt)
    writer.run_info["ckpt_sha256"] = file_sha256(args.ckpt)
    writer.check_compatible(items)

    seconds = 0.0
    if todo:
        # A base model written by tools.pretrain (e.g. MedDiff-FT's lesion-focused fine-tune) has no ControlNet: it
        # sees the mask only through background-preserving generation.
        model = build_latent_diffusion(cfg.model).to(device) if base_model else build_model(cfg.model, device)
        try:
            load_weights(model, args.ckpt, unsafe_pickle=args.unsafe_pickle, map_location=device)
        except CheckpointKeyError as exc:
            raise CheckpointKeyError(f"{args.ckpt}: {exc}") from None
        model.eval().requires_grad_(False)
        start = time.perf_counter()  # sampling only: model building and loading are not part of the rate
        pairs = sample_pairs(model, rerun, hint_size=cfg.hint_size, steps=steps, cfg_scale=cfg_scale, eta=eta,
                             batch_size=args.batch_size, mask_mode=args.mask_mode, augment=augment,
                             precision=args.precision, batched_cfg=not args.separate_cfg, sampler=sampler,
                             cfg_mask=cfg_mask, backgrounds=backgrounds, region=region,
                             intensity=cfg.data.intensity)
        for pair in progress(pairs, total=len(rerun), unit="pair", desc="sampling", disable=args.no_progress):
            if pair.item.name in todo_names:
                writer.write(pair)
        seconds = time.perf_counter() - start
    if args.grid:
        grid = write_grid(args.out, [item.name for item in every[:args.grid]], cell=min(cfg.data.resolution, 256))
        logger.info("grid of the first pairs: %s", grid)
    rate = len(todo) / seconds if todo and seconds > 0 else 0.0
    logger.info("done: %d generated, %d skipped (already complete), sampling %.1f s, %.3f pairs/s → %s", len(todo),
                len(items) - len(todo), seconds, rate, args.out)
    if len(rerun) > len(todo):
        logger.info("%d complete pairs were recomputed (not rewritten) to keep batches as in an uninterrupted run",
                    len(rerun) - len(todo))
    return {"generated": len(todo), "skipped": len(items) - len(todo), "seconds": seconds}


def _scale_or_none(text: str) -> float | str:
    """--cfg-mask: a number, or "none" (text guidance only, overriding a config's sample.cfg_mask)."""
    return "none" if text.lower() == "none" else float(text)


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("tutorial_inference.py", __doc__)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--ckpt", type=Path, required=True, help="merged checkpoint (.safetensors, or .ckpt/.pt)")
    io.add_argument("--config", type=Path, help="experiment YAML (default: the config stored in the checkpoint)")
    io.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.resolution=512")
    io.add_argument("--masks", type=Path, required=True,
                    help="folder of masks (png/jpg/jpeg/bmp/tif/tiff) or a prompt.json JSONL (source + prompt)")
    io.add_argument("--out", type=Path, required=True, help="output folder (images/, masks/, manifest.jsonl)")
    io.add_argument("--prompt", help="prompt for every mask (default for a folder: the checkpoint's sample.prompt, "
                                     "which training sets to its data's prompt; for a JSONL each line's prompt)")
    io.add_argument("--keep-size", action="store_true",
                    help="save each pair at its source mask's size (image resized; mask = the source mask) instead "
                         "of the model resolution")
    io.add_argument("--background", type=Path, metavar="DIR",
                    help="background-preserving generation (MedDiff-FT eq. 2): a folder of background images (or with "
                         "images/: tools.repair_backgrounds' output); each "
                         "pair is generated inside its mask on a background drawn by its seed and keeps it outside")
    io.add_argument("--region", metavar="SPEC",
                    help="with --background only: which latent cells are generated for a mask (recorded in the "
                         f"manifest as 'region'). {REGION_HELP}. Default {DEFAULT_REGION}")
    io.add_argument("--erode", type=int, default=0, metavar="K",
                    help="erode the saved masks by K pixels (MedDiff-FT's mask corrosion; a mask erosion would empty "
                         "is kept as it is; recorded in the manifest; default 0: off)")
    io.add_argument("--erode-kernel", choices=("ellipse", "rect", "cross"), default="ellipse",
                    help="shape of the (2K+1)² erosion element (default ellipse)")
    io.add_argument("--grid", type=int, nargs="?", const=8, default=0, metavar="N",
                    help="write OUT/grid.png with the first N pairs, mask | image (default N: 8)")
    s = p.add_argument_group("sampling")
    s.add_argument("--steps", type=int, help="sampler steps = network evaluations (default: the config's "
                                               "sample.steps; 50 at SD1.5)")
    s.add_argument("--sampler", choices=SAMPLERS, help="ddim (the paper's), or the ODE solvers dpmpp_2m (DPM-Solver++"
                                                       "(2M)) / unipc (UniPC), ≈ 20 steps (default: sample.sampler)")
    s.add_argument("--cfg", type=float, help="guidance scale, uncond = empty prompt + same mask (default: "
                                             "sample.cfg_scale, 9); 1 = conditional branch only")
    s.add_argument("--cfg-mask", type=_scale_or_none, metavar="S",
                   help="separate guidance scale of the mask: a third branch with empty prompt and all-zero hint "
                        "(default: sample.cfg_mask, none = text guidance only)")
    s.add_argument("--eta", type=float, help="DDIM's η, DDIM only; dpmpp_2m/unipc refuse η > 0 (default: "
                                             "sample.eta, 0)")
    s.add_argument("--n-per-mask", type=int, default=1, metavar="N", help="pairs per mask, k = 0..N-1 (default 1)")
    s.add_argument("--seed", type=int, default=0, help="base seed; pair k of mask NAME uses sha256(seed, NAME, k)")
    s.add_argument("--limit", type=int, help="at most this many pairs (k = 0 for every mask first, then k = 1, …)")
    s.add_argument("--batch-size", type=int, default=4,
                   help="pairs per forward pass (default 4); the same sample at any size, bit-identical files need "
                        "the same size (resume with the one you started with)")
    s.add_argument("--separate-cfg", action="store_true",
                   help="run the conditional and unconditional passes separately (less memory, slower)")
    m = p.add_argument_group("masks")
    m.add_argument("--mask-mode", choices=MASK_MODES, default="real",
                   help="real: masks as given; random: flipped/scaled/shifted per pair (seeded), saved as used")
    m.add_argument("--flip-p", type=float, default=0.5, help="random mode: horizontal flip probability (0.5)")
    m.add_argument("--vflip-p", type=float, default=0.5, help="random mode: vertical flip probability (0.5)")
    m.add_argument("--scale-range", type=float, nargs=2, default=(0.8, 1.2), metavar=("LOW", "HIGH"),
                   help="random mode: isotropic scale range (0.8 1.2)")
    m.add_argument("--shift-frac", type=float, default=0.1, help="random mode: max shift, fraction of the size (0.1)")
    r = p.add_argument_group("running")
    r.add_argument("--device", help="torch device (default: the accelerator if any, else cpu)")
    r.add_argument("--precision", choices=PRECISIONS, default="fp32", help="fp32 (default), bf16 or fp16 autocast")
    r.add_argument("--shard", metavar="i/n", help="process shard i of n (0-based); n processes share one --out")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_common_flags(r)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE overrides may come between the options
    return run_cli(_body, args)


def _body(args: argparse.Namespace) -> int:
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
