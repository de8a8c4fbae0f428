"""Benchmark: this project's Siamese training step against the released implementation's, side by side.

``bench/train_step.py`` compares the copy-free loss with a deep-copy reference built from this project's own
blocks, so it cannot show a block-level regression. This script runs the *released* code itself
(``bench/_original_side.py``: its ``cldm.cldm`` ControlNet with the DHI, ``ControlledUnetModel``, ``p_losses`` with
the per-step deep copies, ldm's reentrant checkpoint and einsum attention) against ``siamese.model``'s
``training_loss`` on the same inputs, at the SD1.5 geometry: loss forward, backward and AdamW over the
``sd_locked=False`` set (ControlNet + UNet decoder), gradient checkpointing on, all four terms active (step 2500 of
3000, t = 50 so the L_aug gate is open).

Each side runs in a fresh subprocess (the released packages are also named ``ldm``/``cldm``; a fresh process also
gives each side its own peak resident set, ``VmHWM``). Sides alternate over ``--rounds`` (this machine is noisy);
the table shows every round and the median ratio. ``--profile`` adds a torch.profiler table (top operators by self
CPU time over one step) per side.

    git clone https://github.com/Qiukunpeng/Siamese-Diffusion /path/to/released
    python bench/vs_original.py --original /path/to/released --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP, TOTAL = 2500, 3000
SIDES = ("released", "ours", "ours-lora")
GIB = 2**30


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# -- children --------------------------------------------------------------------------------------------------------
def make_inputs(batch: int, latent: int, context_dim: int = 768) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    s, px = latent, 8 * latent
    mask = (torch.rand(batch, 1, px, px, generator=g) > 0.5).float().expand(batch, 3, px, px).contiguous()
    return {"z0": torch.randn(batch, 4, s, s, generator=g), "mask_hint": mask,
            "image_hint": torch.rand(batch, 3, px, px, generator=g),
            "context": torch.randn(batch, 77, context_dim, generator=g),
            "t": torch.full((batch,), 50, dtype=torch.long), "noise": torch.randn(batch, 4, s, s, generator=g)}


def build_ours(inputs: dict, lora_rank: int = 0) -> tuple:
    import ldm  # noqa: F401  (torchvision shim first)
    from ldm.schedule import Schedule
    from ldm.unet import UNetConfig, UNetModel

    import torch

    from cldm.controlnet import ControlConfig, ControlNet
    from cldm.lora import LoraSettings, add_lora, configure_trainable
    from siamese.losses import LossWeights
    from siamese.model import SiameseDiffusion
    from siamese.schedules import SiameseRecipe

    torch.manual_seed(0)
    cfg = UNetConfig(use_checkpoint=True)
    unet, control = UNetModel(cfg), ControlNet(cfg, ControlConfig())
    unet.requires_grad_(False)
    for p in unet.decoder_parameters().values():
        p.requires_grad_(True)
    if lora_rank:  # method.lora with its default targets instead of the full decoder
        lora = LoraSettings(enabled=True, rank=lora_rank, alpha=float(lora_rank))
        add_lora(unet, control, lora)
        configure_trainable(unet, control, lora)
    unet.set_gradient_checkpointing(True)
    control.set_gradient_checkpointing(True)
    method = SiameseDiffusion(unet, control, Schedule.from_config(), LossWeights(), SiameseRecipe(total_steps=TOTAL))
    params = [p for p in [*control.parameters(), *unet.parameters()] if p.requires_grad]

    def loss() -> torch.Tensor:
        return method.training_loss(inputs["z0"], inputs["mask_hint"], inputs["image_hint"], inputs["context"],
                                    inputs["t"], inputs["noise"], STEP).loss

    return loss, params, [unet, control]


def build_released(inputs: dict, original: Path) -> tuple:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _original_side as released

    host, params = released.build(original, ROOT, STEP, TOTAL)
    return (lambda: released.loss_fn(host, inputs)), params, [host.model.diffusion_model, host.control_model]


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    inputs = make_inputs(args.batch, args.latent)
    if args.side == "released":
        loss_fn, params, modules = build_released(inputs, args.original)
        optimizer = torch.optim.AdamW(params, lr=1e-5)  # the released configure_optimizers
    else:
        from cldm.lightning import make_adamw

        loss_fn, params, modules = build_ours(inputs, args.lora_rank if args.side == "ours-lora" else 0)
        optimizer = make_adamw(params, 1e-5)  # what training uses (TrainModule.configure_optimizers)
    for m in modules:
        m.train()
    rows = []
    total = args.warmup + args.repeats + int(args.profile)
    for i in range(total):
        profile = args.profile and i == args.warmup  # an extra, untimed step
        ctx = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
        if ctx is not None:
            ctx.__enter__()
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if ctx is not None:
            ctx.__exit__(None, None, None)
            table = ctx.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
            (args.profile_dir / f"{args.side}.txt").write_text(table)
        if i >= args.warmup and not profile:
            rows.append({"forward": t1 - t0, "backward": t2 - t1, "adamw": t3 - t2, "step": t3 - t0})
        note(f"{args.side}: step {i + 1}/{total} {t3 - t0:.1f} s (loss {float(loss.detach()):.4f})")
    result = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result["peak_rss_gib"] = _vm_hwm_bytes() / GIB
    result["loss"] = float(loss.detach())
    result["trainable_m"] = sum(p.numel() for p in params) / 1e6
    print(json.dumps(result))


# -- parent ----------------------------------------------------------------------------------------------------------
def run_side(args: argparse.Namespace, side: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--original", str(args.original),
           "--batch", str(args.batch), "--latent", str(args.latent), "--threads", str(args.threads),
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--lora-rank", str(args.lora_rank)]
    if args.profile:
        cmd += ["--profile", "--profile-dir", str(args.profile_dir), "--profile-rows", str(args.profile_rows)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"vs_original: the {side} side exited with {done.returncode} (its log is above)")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--original", type=Path, required=True,
                        help="checkout of the released Siamese-Diffusion repository (github.com/Qiukunpeng/...)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256² images)")
    parser.add_argument("--repeats", type=int, default=4, help="timed steps per side and round (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both sides")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one step per side")
    parser.add_argument("--profile-dir", type=Path, default=Path("bench_out/vs_original_profile"))
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--sides", default="released,ours",
                        help=f"comma-separated, in the first round's order, from {list(SIDES)} (ours-lora: "
                             "method.lora with its default targets instead of the full decoder)")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the ours-lora side")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (args.original / "cldm" / "cldm.py").is_file():
        parser.error(f"--original {args.original}: no cldm/cldm.py there (a checkout of the released repository)")
    if args.side:
        child(args)
        return 0
    sides = tuple(args.sides.split(","))
    if any(side not in SIDES for side in sides) or "released" not in sides:
        parser.error(f"--sides {args.sides}: expected a comma-separated subset of {list(SIDES)} with released")
    if args.profile:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            note(f"round {r + 1}/{args.rounds}: {side}")
            results[side].append(run_side(args, side))
    print(f"SD1.5 Siamese training step, batch {args.batch}, latent {args.latent}² ({8 * args.latent}² images), "
          f"checkpointing on, {args.threads} threads; median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"{'round':>5} {'side':>9} {'trained':>9} {'forward':>9} {'backward':>9} {'AdamW':>7} {'step':>8} "
          f"{'peak RSS':>9} {'loss':>8}")
    for r in range(args.rounds):
        for side in sides:
            x = results[side][r]
            print(f"{r + 1:>5} {side:>9} {x['trainable_m']:>8.1f}M {x['forward']:>8.2f}s {x['backward']:>8.2f}s "
                  f"{x['adamw']:>6.2f}s {x['step']:>7.2f}s {x['peak_rss_gib']:>7.2f}G {x['loss']:>8.5f}")
    for side in (s for s in sides if s != "released"):
        ratios = [results[side][r]["step"] / results["released"][r]["step"] for r in range(args.rounds)]
        print(f"step-time ratio {side}/released per round: " + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; median {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
