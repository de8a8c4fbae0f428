"""Benchmark: one Siamese training step, copy-free (``SiameseDiffusion.training_loss``) vs the released deep-copy form.

The released ``p_losses`` deep-copies the ControlNet and the UNet on every step to get ``sg(c_m)`` and the stopped
UNet; ``siamese.model`` computes the same loss and gradients without copies (``tests/test_siamese_parity.py``).
This script measures what that buys: wall time of forward + backward (interleaved repetitions, median after
warm-up) and peak memory of one step, both formulations side by side, at a tiny geometry or (``--sd15``) at the
SD1.5 geometry with a small latent. It is a measurement script, not a test; run ``python bench/train_step.py -h``.

Peak memory: on an accelerator, ``torch.accelerator.max_memory_allocated`` above what was allocated before the step
(tensors only). On CPU torch exposes no allocator statistics, so each formulation runs in a fresh subprocess that
builds the models, resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``, Linux) and reports
``VmHWM − VmRSS`` over its first step: the peak *resident* memory the step adds on top of models and inputs
(tensors plus allocator slack; falls back to ``ru_maxrss`` deltas where clear_refs is unavailable).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import ldm  # noqa: F401  (torchvision shim first, as everywhere in this project)
from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel

import torch
from torch import Tensor

from cldm.controlnet import ControlConfig, ControlNet
from siamese.losses import LossWeights
from siamese.model import SiameseDiffusion
from siamese.reference import deep_copy_loss
from siamese.schedules import SiameseRecipe

TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                  context_dim=32)
TOTAL_STEPS, STEP = 3000, 2500  # late in the run: image ramp at 5/6 and L_aug active (the most expensive step)
T_CYCLE = (50, 600, 150, 900)  # half of the batch inside the L_aug gate (t ≤ 200); batch 1 → t = 50
VARIANTS = ("copy-free", "deep-copy")
MIB = 2**20


# -- set-up ---------------------------------------------------------------------------------------------------------
def build(args: argparse.Namespace, device: torch.device) -> tuple[UNetModel, ControlNet, dict[str, Tensor]]:
    torch.manual_seed(0)
    cfg = UNetConfig() if args.sd15 else TINY
    unet, control = UNetModel(cfg).to(device), ControlNet(cfg, ControlConfig()).to(device)
    unet.requires_grad_(False)  # sd_locked=False: ControlNet + UNet decoder are trained
    for p in unet.decoder_parameters().values():
        p.requires_grad_(True)
    unet.set_gradient_checkpointing(args.checkpointing)
    control.set_gradient_checkpointing(args.checkpointing)
    b, s = args.batch, args.latent
    g = torch.Generator().manual_seed(1)
    inputs = {"z0": torch.randn(b, 4, s, s, generator=g),
              "mask_hint": (torch.rand(b, 1, 8 * s, 8 * s, generator=g) > 0.5).float().expand(b, 3, 8 * s, 8 * s),
              "image_hint": torch.rand(b, 3, 8 * s, 8 * s, generator=g),
              "context": torch.randn(b, 77, cfg.context_dim, generator=g),
              "t": torch.tensor([T_CYCLE[i % len(T_CYCLE)] for i in range(b)]),
              "noise": torch.randn(b, 4, s, s, generator=g)}
    return unet, control, {k: v.contiguous().to(device) for k, v in inputs.items()}


def make_step(variant: str, unet: UNetModel, control: ControlNet, inputs: dict[str, Tensor],
              device: torch.device, dtype: str) -> Callable[[], None]:
    schedule = Schedule.from_config().to(device)
    weights, recipe = LossWeights(), SiameseRecipe(total_steps=TOTAL_STEPS)
    method = SiameseDiffusion(unet, control, schedule, weights, recipe)
    params = [*unet.parameters(), *control.parameters()]

    def autocast() -> AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def step() -> None:
        with autocast():
            if variant == "copy-free":
                loss = method.training_loss(inputs["z0"], inputs["mask_hint"], inputs["image_hint"],
                                            inputs["context"], inputs["t"], inputs["noise"], STEP).loss
            else:
                loss, _ = deep_copy_loss(unet, control, schedule, weights, recipe, STEP, **inputs)
        loss.backward()
        synchronize(device)
        for p in params:  # as optimizer.zero_grad(set_to_none=True): the gradients count inside the step
            p.grad = None

    return step


def note(message: str) -> None:
    """Progress on stderr (an SD1.5 run on CPU takes minutes); the results go to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


# -- CPU peak resident memory (one fresh process per formulation) --------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_free_heap() -> None:
    """Return freed heap pages to the kernel (glibc ``malloc_trim``), so the resident set before the measured step
    holds the live data only and the step's own peak shows up in the high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the base then includes cached free memory (peak understated)
        pass


def cpu_memory_child(args: argparse.Namespace) -> None:
    """Runs in a subprocess: a warm-up step of ``args.child``, then one measured step; prints a JSON line."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    unet, control, inputs = build(args, device)
    step = make_step(args.child, unet, control, inputs, device, args.dtype)
    error = None
    try:
        step()  # warm-up: one-time costs (kernel caches, thread pools) are not the step's
    except Exception as exc:  # reported, not raised: the other formulation still gets measured
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # resets VmHWM to the current resident set
        base, method = _proc_status_kib("VmRSS"), "VmHWM"
    except OSError:
        base, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    if error is None:
        step()
    peak = _proc_status_kib("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_mib": base / 1024, "peak_delta_mib": (peak - base) / 1024, "method": method,
                      "error": error}))


def cpu_memory(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--dtype", args.dtype, "--batch",
           str(args.batch), "--latent", str(args.latent), "--threads", str(args.threads)]
    cmd += ["--sd15"] * args.sd15 + ["--checkpointing"] * args.checkpointing
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": f"memory subprocess exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the measurement -------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    memory: dict[str, dict] = {}
    if device.type == "cpu" and not args.no_memory:  # before building here, so the children have the RAM
        for v in VARIANTS:
            note(f"peak memory of {v} (fresh subprocess)")
            memory[v] = cpu_memory(args, v)

    note("building the models")
    unet, control, inputs = build(args, device)
    n_params = sum(p.numel() for p in [*unet.parameters(), *control.parameters()])
    n_train = sum(p.numel() for p in [*unet.parameters(), *control.parameters()] if p.requires_grad)
    steps = {v: make_step(v, unet, control, inputs, device, args.dtype) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    errors: dict[str, str] = {}
    for rep in range(args.warmup + args.repeats):
        order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # alternate who goes first (caches, thermal, load)
        for variant in order:
            if variant in errors:
                continue
            if device.type != "cpu":
                torch.accelerator.reset_peak_memory_stats()
                base = torch.accelerator.memory_allocated()
            start = time.perf_counter()
            try:
                steps[variant]()
            except Exception as exc:  # e.g. a formulation that cannot run with checkpointing: report, go on
                errors[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            elapsed = time.perf_counter() - start
            note(f"{'warm-up' if rep < args.warmup else 'timed'} step {rep + 1}: {variant} {elapsed:.2f} s")
            if rep >= args.warmup:
                times[variant].append(elapsed)
            if device.type != "cpu":
                peak = (torch.accelerator.max_memory_allocated() - base) / MIB
                old = memory.get(variant, {}).get("peak_delta_mib", 0.0)
                memory[variant] = {"base_mib": base / MIB, "peak_delta_mib": max(old, peak),
                                   "method": "max_memory_allocated"}

    report(args, device, inputs["t"].tolist(), n_params, n_train, times, errors, memory)


def report(args: argparse.Namespace, device: torch.device, t: list[int], n_params: int, n_train: int,
           times: dict[str, list[float]], errors: dict[str, str], memory: dict[str, dict]) -> None:
    """The results table on stdout: per formulation, step time and peak memory; then the ratios."""
    geometry = "SD1.5 (UNetConfig(), ControlConfig())" if args.sd15 else "tiny (ch 32, mult 1,2, 1 res block)"
    print(f"geometry: {geometry}; {n_params / 1e6:.1f} M parameters, {n_train / 1e6:.1f} M trainable")
    print(f"batch {args.batch}, latent 4x{args.latent}x{args.latent}, hints 3x{8 * args.latent}x{8 * args.latent}, "
          f"t = {t}, step {STEP}/{TOTAL_STEPS} (all four terms), {args.dtype}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}, device {device}, threads {args.threads}, "
          f"median of {args.repeats} after {args.warmup} warm-up")
    print(f"{'formulation':<12} {'step ms (median)':>17} {'min..max ms':>15} {'step peak MiB':>14} "
          f"{'base MiB':>9} {'total peak MiB':>15}")
    medians: dict[str, float] = {}
    for v in VARIANTS:
        if v in errors:
            print(f"{v:<12} FAILED ({errors[v]})")
            continue
        medians[v] = statistics.median(times[v]) * 1e3
        spread = f"{min(times[v]) * 1e3:.0f}..{max(times[v]) * 1e3:.0f}"
        mem = memory.get(v, {})
        if "peak_delta_mib" in mem and not mem.get("error"):
            step_peak, base = mem["peak_delta_mib"], mem["base_mib"]
            cols = f"{step_peak:>14.1f} {base:>9.0f} {base + step_peak:>15.0f}"
        else:
            cols = f"{'-':>14} {'-':>9} {'-':>15}" + (f"  (memory: {mem['error']})" if mem.get("error") else "")
        print(f"{v:<12} {medians[v]:>17.1f} {spread:>15} {cols}")
    if len(medians) == 2:
        line = f"ratio deep-copy / copy-free: time {medians['deep-copy'] / medians['copy-free']:.2f}x"
        mems = [memory.get(v, {}) for v in VARIANTS]
        if all("peak_delta_mib" in m and not m.get("error") for m in mems):
            totals = [m["base_mib"] + m["peak_delta_mib"] for m in mems]
            line += (f", step peak memory {mems[1]['peak_delta_mib'] / mems[0]['peak_delta_mib']:.2f}x, "
                     f"total peak memory {totals[1] / totals[0]:.2f}x")
        print(line)
    if memory:
        method = next((m["method"] for m in memory.values() if "method" in m), "?")
        what = ("resident set of a fresh process per formulation, one step after a warm-up step"
                if device.type == "cpu" else "tensors allocated on the device, max over the steps")
        print(f"memory: {method} ({what}); step peak = peak during forward+backward above base (models + inputs, "
              "gradients freed); total = base + step peak")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or an accelerator device string")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast (parameters stay fp32, as bf16-mixed training)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per formulation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per formulation first")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 4 tiny, 1 with --sd15)")
    parser.add_argument("--latent", type=int, default=None,
                        help="latent side (default: 8 tiny, 16 with --sd15); hints are 8x larger")
    parser.add_argument("--sd15", action="store_true", help="SD1.5 geometry instead of the tiny one")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in UNet and ControlNet")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (1 if args.sd15 else 4)
    args.latent = args.latent or (16 if args.sd15 else 8)
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1 or args.latent < 1:
        parser.error("--repeats, --batch and --latent must be >= 1 and --warmup >= 0")
    if args.latent % 2 ** (len((UNetConfig() if args.sd15 else TINY).channel_mult) - 1):
        parser.error(f"--latent {args.latent} must be divisible by the UNet's total downsampling")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        cpu_memory_child(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
