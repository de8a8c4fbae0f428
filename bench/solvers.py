"""Benchmark: how close DDIM, DPM-Solver++(2M) and UniPC get to a many-step DDIM reference, per network pass.

For a batch of seeds (one generator each, so every sampler starts from the same x_T) the final latents of each
sampler at each step count are compared with those of DDIM at ``--ref-steps`` (250): RMS and max |Δ| over the batch,
and the network passes per sample (classifier-free guidance doubles them). The model is a real trained one: by
default the shipped text-conditioned tiny base (``data/pretrained/base_tiny.safetensors``, prompt
``sample.prompt``); with ``--ckpt PATH --masks DIR`` a merged ControlNet checkpoint sampled on the first masks of
DIR, where the decoded images are also scored for mask fidelity with the colour rule of
``siamese.evaluation.fidelity`` (Dice of its segmentation of each image vs the conditioning mask; meaningful for
the framework's generated lesion domain only). A measurement script, not a test; ``python bench/solvers.py -h``.

    python bench/solvers.py                                               # tiny base, 8 seeds, cfg from its config
    python bench/solvers.py --ckpt merged.safetensors --masks data/masks --cfg 3 model.first_stage.scale_factor=0.36
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ldm.checkpoint import load_state_dict, load_strict, read_metadata
from ldm.model import LatentDiffusion
from ldm.solvers import SAMPLERS

import numpy as np
import torch
from torch import Tensor

from siamese.config import ExperimentConfig, config_from_metadata, load_config
from siamese.data.masks import read_mask, resize_mask
from siamese.evaluation.fidelity import dice, segment_generated_lesion
from siamese.factory import build_latent_diffusion, build_model
from siamese.sampling import collect_masks
from tools.inference import resolve_config

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "data" / "pretrained" / "base_tiny.safetensors"


def note(message: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(args: argparse.Namespace) -> tuple[LatentDiffusion, ExperimentConfig]:
    """The base (its config from its metadata, or --config) or, with --ckpt, the ControlNet model."""
    if args.ckpt is None:
        cfg = load_config(args.config, args.overrides) if args.config else config_from_metadata(
            read_metadata(BASE), str(BASE))
        net = build_latent_diffusion(cfg.model)
        path = BASE
    else:
        cfg = resolve_config(args.config, args.overrides, args.ckpt)
        net = build_model(cfg.model)
        path = args.ckpt
    load_strict(net, load_state_dict(path)).raise_if_bad(str(path))
    return net.eval().requires_grad_(False), cfg


def conditioning(net: LatentDiffusion, cfg: ExperimentConfig, args: argparse.Namespace
                 ) -> tuple[dict, dict, dict | None, list[np.ndarray] | None, tuple[int, ...]]:
    """(cond, uncond, uncond_all, masks, latent shape) for a batch of ``args.batch``."""
    n = args.batch
    f = net.latent_factor
    size = cfg.data.resolution
    if args.masks is None:
        prompts = [cfg.sample.prompt] * n
        cond = {"context": net.encode_prompts(prompts)}
        uncond = {"context": net.encode_prompts([""] * n)}
        return cond, uncond, None, None, (n, net.unet.config.in_channels, size // f, size // f)
    sources = collect_masks(args.masks, default_prompt=cfg.sample.prompt)[:n]
    if len(sources) < n:
        raise SystemExit(f"{args.masks}: {len(sources)} masks, --batch {n} needs as many")
    masks = [read_mask(s.path) for s in sources]
    hint = torch.from_numpy(np.stack([resize_mask(m, cfg.hint_size) for m in masks]).astype(np.float32))
    hint = hint[:, None].repeat(1, 3, 1, 1)
    cond = {"context": net.encode_prompts([s.prompt for s in sources]), "hint": hint}
    empty = net.encode_prompts([""] * n)
    uncond = {"context": empty, "hint": hint}
    uncond_all = {"context": empty, "hint": torch.zeros_like(hint)} if args.cfg_mask is not None else None
    return cond, uncond, uncond_all, masks, (n, net.unet.config.in_channels, hint.shape[-2] // f, hint.shape[-1] // f)


def mask_dice(net: LatentDiffusion, z: Tensor, masks: list[np.ndarray]) -> float:
    images = ((net.decode_latents(z) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([dice(segment_generated_lesion(img), resize_mask(m, img.shape[:2]))
                          for img, m in zip(images, masks)]))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if (args.ckpt is None) != (args.masks is None):
        raise SystemExit("--ckpt and --masks go together (a ControlNet checkpoint is sampled on masks)")
    net, cfg = load(args)
    cfg_scale = cfg.sample.cfg_scale if args.cfg is None else args.cfg
    cond, uncond, uncond_all, masks, shape = conditioning(net, cfg, args)
    rows = [0]  # latent rows through the UNet (once per ε, ControlNet or not): passes × batch
    net.unet.register_forward_pre_hook(lambda module, inputs: rows.__setitem__(0, rows[0] + inputs[0].shape[0]))
    x_T = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(args.seed + i))
                       for i in range(shape[0])])

    def sample(sampler: str, steps: int) -> tuple[Tensor, float, float]:
        rows[0] = 0
        start = time.perf_counter()
        z = net.sample_latents(cond, uncond, shape, steps=steps, cfg_scale=cfg_scale, eta=0.0, generator=None,
                               x_T=x_T, batched_cfg=True, progress=False, sampler=sampler, uncond_all=uncond_all,
                               scale_all=args.cfg_mask)
        return z, rows[0] / shape[0], time.perf_counter() - start

    what = f"{args.ckpt.name} on {args.masks}" if args.ckpt else BASE.name
    note(f"{what}: DDIM reference, {args.ref_steps} steps")
    ref, ref_passes, ref_time = sample("ddim", args.ref_steps)
    results = []
    for sampler in args.samplers:
        for steps in args.steps:
            z, passes, seconds = sample(sampler, steps)
            d = (z - ref).float()
            results.append((sampler, steps, passes, d.pow(2).mean().sqrt().item(), d.abs().max().item(), seconds,
                            mask_dice(net, z, masks) if masks else None))
            note(f"{sampler} {steps}: rms {results[-1][3]:.4f} ({seconds:.1f} s)")
    print(f"{what}: batch {shape[0]} (seeds {args.seed}..{args.seed + shape[0] - 1}), latents {tuple(shape[1:])}, "
          f"cfg {cfg_scale}" + (f", cfg_mask {args.cfg_mask}" if args.cfg_mask is not None else "")
          + f"; reference DDIM {args.ref_steps} steps (latent RMS {ref.pow(2).mean().sqrt().item():.3f}, "
          f"{ref_time:.0f} s); {args.threads} CPU threads")
    print("| sampler | steps | network passes / sample | RMS to reference | max abs to reference | seconds"
          + (" | mask Dice (colour rule) |" if masks else " |"))
    print("|---|---|---|---|---|---|" + ("---|" if masks else ""))
    for sampler, steps, passes, rms, mx, seconds, dc in results:
        print(f"| {sampler} | {steps} | {passes:.0f} | {rms:.4f} | {mx:.4f} | {seconds:.1f} |"
              + (f" {dc:.3f} |" if dc is not None else ""))
    if masks:
        print(f"| ddim (reference) | {args.ref_steps} | {ref_passes:.0f} | 0 | 0 | {ref_time:.1f} | "
              f"{mask_dice(net, ref, masks):.3f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", type=Path, help="merged ControlNet checkpoint (with --masks); default: the tiny base")
    p.add_argument("--masks", type=Path, help="folder of masks or prompt.json, the first --batch are used")
    p.add_argument("--config", type=Path, help="experiment YAML (default: the config in the checkpoint's metadata)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--batch", type=int, default=8, help="samples (seeds) per run (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sample i uses seed SEED + i (default 0)")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50], help="step counts (default 10 20 50)")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS, default=list(SAMPLERS), help="default: all")
    p.add_argument("--ref-steps", type=int, default=250, help="DDIM steps of the reference (default 250)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the config's sample.cfg_scale)")
    p.add_argument("--cfg-mask", type=float, help="separate mask guidance (ControlNet only; default: off)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
