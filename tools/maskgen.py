"""``python -m tools.maskgen``: train MedDiff-FT's mask generator (a small DDPM over binary masks) and sample masks.

    python -m tools.maskgen train --config configs/maskgen_tiny.yaml --out models/maskgen_tiny.safetensors  # CPU
    python -m tools.maskgen train --config configs/siamese_sd15.yaml data.root=data/kvasir \\
        --out models/maskgen.safetensors                                     # the paper's size (256², 64..512 wide)
    python -m tools.maskgen sample --ckpt models/maskgen_tiny.safetensors --out gen_masks --n 200 --seed 0
    python tutorial_inference.py --ckpt merged.safetensors --masks gen_masks/masks --out pairs   # pairs from them

``train`` runs ``tools.train.train`` (Lightning, DeepSpeed, checkpoints, ``--resume latest``) with the ``maskgen``
section's steps, lr and batch size in ``<train.output_dir>/maskgen``, then writes the trained UNet's fp32 weights
with the resolved config and its provenance (``siamese.provenance``: every training mask by digest, also in
``<train.output_dir>/maskgen/provenance.json``) in the metadata. ``sample`` takes everything from that metadata
(``--sampler``, ``--eta`` and ``--steps`` override the config's sample.sampler, sample.eta and maskgen.sample_steps;
what was used is recorded in ``statistics.json``): it
writes ``OUT/masks/gen_000000.png`` … (exactly 0/255), ``OUT/manifest.jsonl`` (name, seed, area, components, IoU to
the nearest training mask), ``OUT/statistics.json`` (the generated masks against the training masks: those of the
config's data, or ``--train-masks DIR``) and ``OUT/provenance.json`` (the generator's records, which pairs sampled
from ``OUT/masks`` inherit), into a temporary folder renamed at the end. Each mask has its own seed
(SHA-256 of ``--seed`` and its index), so the output does not depend on ``--batch-size``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.fileio import replace_dir, write_json_atomic
from ldm.settings import SAMPLERS

import numpy as np

from siamese.config import (
    METADATA_CONFIG,
    ConfigError,
    ExperimentConfig,
    checkpoint_metadata,
    checkpoint_provenance,
    config_from_metadata,
    load_config,
)
from siamese.data.images import write_png
from siamese.data.masks import mask_to_png
from siamese.data.provenance import Provenance
from tools._cli import add_common_flags, check_output, check_output_dir, make_parser, run

if TYPE_CHECKING:
    from ldm.unet import UNetModel

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.maskgen")
KIND = "maskgen"


def train_maskgen(cfg_path: Path, overrides: list[str], out: Path, *, resume: str | None, force: bool,
                  unsafe_pickle: bool) -> Path:
    from ldm.checkpoint import load_state_dict, load_strict, save_state_dict

    from siamese.meddiff.maskgen import (
        MaskDataset,
        MaskDDPMModule,
        build_denoiser,
        build_schedule,
        run_config,
        training_masks,
        training_masks_record,
    )
    from siamese.run_dir import run_provenance
    from tools.pretrain import consolidated_weights, stage_run
    from tools.train import train

    cfg = load_config(cfg_path, overrides)
    check_output(out, force=force)
    if cfg.data.root is not None and not Path(cfg.data.root).exists():
        raise FileNotFoundError(f"data.root not found: {cfg.data.root}")
    stage_cfg = run_config(cfg)

    def build(c: ExperimentConfig) -> tuple[MaskDDPMModule, MaskDataset]:
        module = MaskDDPMModule(build_denoiser(cfg.maskgen), build_schedule(cfg.maskgen), lr=cfg.maskgen.lr,
                                threshold=cfg.maskgen.threshold, prediction=cfg.maskgen.prediction)
        return module, MaskDataset(training_masks(cfg))

    stage_resume, stage_force = stage_run(stage_cfg, resume, force)

    def provenance() -> Provenance:  # a fresh network, trained on the masks alone
        return Provenance((training_masks_record(cfg, f"mask generator run {stage_cfg.train.output_dir}"),))

    train(stage_cfg, resume=stage_resume, force=stage_force, unsafe_pickle=unsafe_pickle, build=build,
          provenance=None if stage_resume else provenance())
    weights = consolidated_weights(stage_cfg, "unet.", unsafe_pickle=unsafe_pickle)
    if cfg.train.ema.enabled:  # DDPM samples from the EMA weights (Ho et al. 2020), written at the end of training
        ema = load_state_dict(Path(stage_cfg.train.output_dir) / "ema_trainable.safetensors")
        weights = {k[len("unet."):]: v for k, v in ema.items() if k.startswith("unet.")}
        logger.info("mask generator: EMA weights (decay %g)", cfg.train.ema.decay)
    load_strict(build_denoiser(cfg.maskgen), weights).raise_if_bad("mask generator")
    # The run's record (written when it started), else (a run from before provenance was recorded) the masks now.
    recorded = run_provenance(stage_cfg.train.output_dir)
    save_state_dict(weights, out, metadata=checkpoint_metadata(cfg, KIND, recorded or provenance()), overwrite=True)
    logger.info("mask generator: %s. Next: python -m tools.maskgen sample --ckpt %s --out DIR --n N", out, out)
    return out


def load_maskgen(ckpt: Path, device: str = "cpu") -> tuple[ExperimentConfig, UNetModel]:
    """(config, denoiser in eval mode) from a ``train`` output."""
    from ldm.checkpoint import load_state_dict, load_strict, read_metadata

    from siamese.meddiff.maskgen import build_denoiser

    if not ckpt.is_file():
        raise FileNotFoundError(f"--ckpt not found: {ckpt}")
    meta = read_metadata(ckpt)
    cfg = config_from_metadata(meta, str(ckpt))
    if cfg is None or meta.get("siamese.kind") != KIND:
        raise ConfigError(f"{ckpt} is not a mask generator of python -m tools.maskgen train (no maskgen config)")
    if "prediction:" not in meta.get(METADATA_CONFIG, ""):  # written before maskgen.prediction existed: ε models
        cfg = replace(cfg, maskgen=replace(cfg.maskgen, prediction="eps"))
    unet = build_denoiser(cfg.maskgen)
    load_strict(unet, load_state_dict(ckpt)).raise_if_bad(str(ckpt))
    return cfg, unet.to(device).eval()


def sample_folder(ckpt: Path, out: Path, n: int, *, seed: int = 0, steps: int | None = None, batch_size: int = 16,
                  train_masks: Path | None = None, force: bool = False, device: str = "cpu",
                  sampler: str | None = None, eta: float | None = None) -> dict:
    """Sample ``n`` masks into ``out`` (see the module docstring); returns the statistics summary. ``sampler`` and
    ``eta`` (None: the checkpoint config's sample.sampler / sample.eta) choose the solver; η > 0 is DDIM only."""
    import torch

    from siamese.meddiff.maskgen import (
        build_schedule,
        folder_masks,
        mask_seed,
        mask_statistics,
        sample_masks,
        training_masks,
    )

    if n <= 0 or batch_size <= 0:
        raise ValueError(f"--n and --batch-size must be > 0, got {n}, {batch_size}")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"--sampler {sampler!r} is not one of {list(SAMPLERS)}")
    if eta is not None and not eta >= 0:
        raise ValueError(f"--eta must be >= 0, got {eta}")
    check_output_dir(out, force=force)
    cfg, unet = load_maskgen(ckpt, device)
    sampler = cfg.sample.sampler if sampler is None else sampler
    eta = float(cfg.sample.eta if eta is None else eta)
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"--sampler {sampler} is a deterministic ODE solver: it needs --eta 0 (got {eta}); η > 0 "
                         "needs --sampler ddim")
    m = cfg.maskgen
    reference = (folder_masks(train_masks, m.resolution) if train_masks is not None else training_masks(cfg))
    schedule = build_schedule(m)
    seeds = [mask_seed(seed, i) for i in range(n)]
    chunks = []
    for start in range(0, n, batch_size):
        gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
        chunks.append(sample_masks(unet, schedule, len(gens), m.resolution, steps=steps or m.sample_steps,
                                   generator=gens, sampler=sampler, threshold=m.threshold,
                                   prediction=m.prediction, eta=eta))
        logger.info("sampled %d / %d masks", start + len(gens), n)
    generated = np.concatenate(chunks)
    per_mask, summary = mask_statistics(generated, np.stack(reference))
    summary.update({"seed": seed, "steps": steps or m.sample_steps, "sampler": sampler, "eta": eta,
                    "checkpoint": str(ckpt)})
    with replace_dir(out) as tmp:
        (tmp / "masks").mkdir()
        with open(tmp / "manifest.jsonl", "w", encoding="utf-8") as manifest:
            for i, (mask, stats) in enumerate(zip(generated, per_mask)):
                name = f"gen_{i:06d}"
                write_png(tmp / "masks" / f"{name}.png", mask_to_png(mask))
                manifest.write(json.dumps({"name": name, "seed": seeds[i], **stats}) + "\n")
        write_json_atomic(tmp / "statistics.json", summary)
        checkpoint_provenance(ckpt).write(tmp)  # the masks come from the generator: its training masks' records
    if summary["empty_generated"]:
        logger.warning("%d of %d generated masks are empty (kept, listed in the manifest with area 0)",
                       summary["empty_generated"], n)
    logger.info("%d masks in %s (%s, η = %g): area %.3f (training %.3f), components %.2f (training %.2f), "
                "nearest-train IoU %.3f, %d near copies", n, out, sampler, eta, summary["area"]["generated"]["mean"],
                summary["area"]["training"]["mean"], summary["components"]["generated"]["mean"],
                summary["components"]["training"]["mean"], summary["nearest_train_iou"]["mean"],
                summary["near_copies"])
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.maskgen", __doc__)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the mask DDPM through the common trainer")
    t.add_argument("--config", type=Path, required=True, help="experiment YAML (e.g. configs/maskgen_tiny.yaml)")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. maskgen.total_steps=50")
    t.add_argument("--out", type=Path, required=True, help="the mask generator (.safetensors)")
    t.add_argument("--resume", metavar="latest", help="continue from the newest checkpoint")
    t.add_argument("--force", action="store_true", help="restart the run and overwrite --out")
    add_common_flags(t)
    s = sub.add_parser("sample", help="sample binary masks from a trained generator")
    s.add_argument("--ckpt", type=Path, required=True, help="output of `train`")
    s.add_argument("--out", type=Path, required=True,
                   help="output folder (masks/, manifest.jsonl, statistics.json, provenance.json)")
    s.add_argument("--n", type=int, required=True, help="number of masks")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, help="solver steps (default: maskgen.sample_steps)")
    s.add_argument("--sampler", choices=SAMPLERS,
                   help="ddim or the ODE solvers dpmpp_2m / unipc (default: the checkpoint config's sample.sampler)")
    s.add_argument("--eta", type=float, help="DDIM's η, DDIM only; dpmpp_2m/unipc refuse η > 0 (default: the "
                                             "checkpoint config's sample.eta, 0; 1 = DDPM's ancestral step)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--train-masks", type=Path, help="folder of masks to compare with (default: the config's data)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    s.add_argument("--force", action="store_true", help="replace an existing --out")
    add_common_flags(s)
    # Subcommands rule out parse_intermixed_args: KEY=VALUE words after the options are taken as overrides here.
    args, extra = p.parse_known_args(argv)
    stray = [word for word in extra if word.startswith("-") or "=" not in word or args.command != "train"]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _body(args: argparse.Namespace) -> int:
    if args.command == "train":
        if args.resume not in (None, "latest"):
            raise ConfigError("--resume takes 'latest'")
        train_maskgen(args.config, args.overrides, args.out, resume=args.resume, force=args.force,
                      unsafe_pickle=args.unsafe_pickle)
    else:
        sample_folder(args.ckpt, args.out, args.n, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                      train_masks=args.train_masks, force=args.force, device=args.device, sampler=args.sampler,
                      eta=args.eta)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
