"""Benchmark: seconds per sampled image-mask pair, classifier-free guidance batched vs two separate passes.

Guidance needs ε for the prompt and for the empty prompt at every DDIM step. ``batched`` runs both on one doubled
batch (one UNet + ControlNet call per step, as ldm); ``separate`` makes two calls of the plain batch (half the
activation memory). This script runs ``siamese.sampling.sample_pairs`` — the code behind tutorial_inference.py, from
mask files to uint8 pairs, without the PNG writing — both ways, side by side in one run (interleaved repetitions,
which one goes first alternating, median after warm-up), and prints seconds per pair, pairs/s and the ratio. The
weights are freshly initialised (no checkpoint is read): the cost does not depend on their values. It is a
measurement script, not a test; ``python bench/sample.py -h``.

    python bench/sample.py                                            # tiny config, CPU, 50 steps, batch 4
    python bench/sample.py --config configs/siamese_sd15.yaml --device cuda:0 --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first, as everywhere in this project)

import torch

from siamese.config import load_config
from siamese.data.synthetic import write_synthetic_dataset
from siamese.factory import build_model
from siamese.sampling import collect_masks, make_items, sample_pairs

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("batched", "separate")
MIB = 2**20


def note(message: str) -> None:
    """Progress on stderr; the results go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    note(f"building the model ({args.config.name}) on {device}")
    model = build_model(cfg.model, device).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_dataset(tmp, args.batch, cfg.hint_size)
        items = make_items(collect_masks(Path(tmp) / "masks", default_prompt=cfg.sample.prompt), 1, seed=0)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks: dict[str, float] = {}
        for rep in range(args.warmup + args.repeats):
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                if device.type != "cpu":
                    torch.accelerator.synchronize()
                    torch.accelerator.reset_peak_memory_stats()
                    base = torch.accelerator.memory_allocated()
                start = time.perf_counter()
                pairs = list(sample_pairs(model, items, hint_size=cfg.hint_size, steps=args.steps,
                                          cfg_scale=args.cfg, batch_size=args.batch, precision=args.precision,
                                          batched_cfg=variant == "batched"))
                elapsed = time.perf_counter() - start  # the pairs are uint8 on the host: the device is done
                assert len(pairs) == args.batch
                if device.type != "cpu":
                    peaks[variant] = max(peaks.get(variant, 0.0), (torch.accelerator.max_memory_allocated() - base))
                note(f"{'warm-up' if rep < args.warmup else 'timed'} {rep + 1}: {variant} {elapsed:.2f} s")
                if rep >= args.warmup:
                    times[variant].append(elapsed)
    report(args, cfg.hint_size, n_params, device, times, peaks)


def report(args: argparse.Namespace, size: int, n_params: int, device: torch.device, times: dict[str, list[float]],
           peaks: dict[str, float]) -> None:
    print(f"config {args.config.name} {' '.join(args.overrides)}: {n_params / 1e6:.1f} M parameters, {size}x{size} "
          f"pairs; {args.steps} DDIM steps, cfg {args.cfg}, batch {args.batch}, {args.precision}, device {device}"
          + (f", threads {args.threads}" if device.type == "cpu" else "")
          + f"; median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'guidance':<9} {'s/pair (median)':>16} {'min..max s/pair':>16} {'pairs/s':>8} {'peak MiB':>9}")
    per_pair = {}
    for v in VARIANTS:
        per_pair[v] = statistics.median(times[v]) / args.batch
        spread = f"{min(times[v]) / args.batch:.3f}..{max(times[v]) / args.batch:.3f}"
        peak = f"{peaks[v] / MIB:.0f}" if v in peaks else "-"
        print(f"{v:<9} {per_pair[v]:>16.3f} {spread:>16} {1 / per_pair[v]:>8.2f} {peak:>9}")
    print(f"ratio separate / batched: time {per_pair['separate'] / per_pair['batched']:.2f}x"
          + (f", peak memory {peaks['separate'] / peaks['batched']:.2f}x" if len(peaks) == 2 else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=REPO / "configs" / "siamese_tiny.yaml",
                   help="experiment YAML for the geometry (default: the tiny config; configs/siamese_sd15.yaml: SD1.5)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.resolution=512")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    p.add_argument("--batch", type=int, default=4, help="pairs per batch (default 4)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg", type=float, default=9.0, help="guidance scale (default 9)")
    p.add_argument("--repeats", type=int, default=3, help="timed batches per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per variant first (default 1)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
