"""GPU benchmark suite: the SD1.5 Siamese training step and mask-conditioned sampling, in one budgeted run.

Made for a short GPU lease (``bash bench/gpu_suite.sh`` wraps it: environment summary, the ``gpu`` tests, then this
script, all logged). Measured, most important first, so a budget that runs out drops the least useful rows:

1. the Siamese training step, copy-free (``SiameseDiffusion.training_loss``), bf16-mixed (autocast) and fp32;
2. the same step in the released deep-copy formulation (``siamese.reference.deep_copy_loss``), both precisions, with
   the copy-free / deep-copy ratio;
3. sampling image-mask pairs with ``ControlLDM.sample`` (random weights, random-weight text encoder, nothing read
   from disk): 50 DDIM steps and 20 DPM-Solver++(2M) steps, cfg 9, bf16 autocast and fp32.

A training step is loss + backward + AdamW (``fused=True`` where the device has the kernel) over the
``sd_locked=False`` set (ControlNet + UNet decoder), gradient checkpointing on, step 2500 of 3000 (all four loss terms
active), ``t`` cycling 50, 600, 150, 900 (half the batch inside the L_aug gate), as ``bench/train_step.py``. Inputs
are latents and text contexts: the VAE encoding and prompt encoding of the Lightning step are not included.

Per row: throughput (batch / median time after warm-up, the device synchronised around each step), peak memory
(``max_memory_allocated`` after a reset before the timed steps: weights, optimizer state, gradients, activations;
on CPU the process's resident high-water mark instead), FLOPs counted once with ``torch.utils.flop_counter`` on an
extra untimed run of the same step (matmuls, convolutions, attention; as executed, so the forward that gradient
checkpointing recomputes is included), and MFU = FLOPs / time / the GPU's dense bf16 peak, for fp32 rows too.
An out-of-memory error or any other failure is reported in its row and the suite goes on. Weights are freshly
initialised: the cost does not depend on their values. ``--tiny`` runs the same code at a CPU-sized geometry.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file from any directory, with or without the package installed
    sys.path.insert(0, str(REPO))

import ldm  # noqa: E402,F401  (torchvision shim first, as everywhere in this project)
from ldm.schedule import Schedule  # noqa: E402
from ldm.unet import UNetConfig, UNetModel  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cldm.controlnet import ControlConfig, ControlNet  # noqa: E402
from siamese.losses import LossWeights  # noqa: E402
from siamese.model import SiameseDiffusion  # noqa: E402
from siamese.reference import deep_copy_loss  # noqa: E402
from siamese.schedules import SiameseRecipe  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from _device import (  # noqa: E402
    autocast,
    device_name,
    free_memory,
    fused_adamw_supported,
    peak_tflops,
    read_peak_gib,
    reset_peak,
    synchronize,
)
from _gpu_report import Row, fmt_num, markdown, write_json  # noqa: E402

TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=2, context_dim=32)  # = bench/train_step.py's TINY = configs/siamese_tiny.yaml
TOTAL_STEPS, STEP = 3000, 2500  # late in the run: image ramp 5/6 and L_aug active (the most expensive step)
T_CYCLE = (50, 600, 150, 900)
PROMPT = "A photo of a polyp."
OOM_ERROR = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

# (id, kind, variant, precision): most important first; consecutive rows of one kind share the built networks.
PLAN: tuple[tuple[str, str, str, str], ...] = (
    ("copy-free:bf16", "train", "copy-free", "bf16"), ("copy-free:fp32", "train", "copy-free", "fp32"),
    ("deep-copy:bf16", "train", "deep-copy", "bf16"), ("deep-copy:fp32", "train", "deep-copy", "fp32"),
    ("ddim:bf16", "sample", "ddim", "bf16"), ("dpmpp_2m:bf16", "sample", "dpmpp_2m", "bf16"),
    ("ddim:fp32", "sample", "ddim", "fp32"), ("dpmpp_2m:fp32", "sample", "dpmpp_2m", "fp32"))


def note(message: str) -> None:
    """Progress on stderr; the table goes to stdout."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the measurement loop shared by training and sampling ------------------------------------------------------------
def measure(row: Row, run: Callable[[], None], device: torch.device, args: argparse.Namespace, deadline: float,
            repeats: int, flops_key: str, per_step: int = 1) -> Row:
    """A first untimed run (FLOP-counted unless this kind of step was counted already), ``args.warmup`` more untimed
    runs, then up to ``repeats`` timed ones (fewer if the budget's deadline passes, but at least one)."""
    seen = args.flops_seen  # FLOPs depend on shapes only: counted once per kind of step, whatever the precision
    if flops_key in seen:
        run()
    else:
        with FlopCounterMode(display=False) as counter:
            run()
        seen[flops_key] = float(counter.get_total_flops())
    synchronize(device)
    row.flops = seen[flops_key]
    for _ in range(args.warmup):
        if time.monotonic() > deadline:
            break
        run()
    reset_peak(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if time.monotonic() > deadline:
            break
    row.timed, row.batch_s = len(times), statistics.median(times)
    row.throughput, row.step_ms = row.batch / row.batch_s, row.batch_s / per_step * 1e3
    row.peak_gib = read_peak_gib(device)
    if args.peak is not None and row.flops > 0:
        row.mfu = row.flops / row.batch_s / (args.peak * 1e12)
    if len(times) < repeats:
        row.status = f"ok ({len(times)} of {repeats} timed: budget)"
    return row


# -- training --------------------------------------------------------------------------------------------------------
def build_train(args: argparse.Namespace, device: torch.device, info: dict) -> dict:
    torch.manual_seed(0)
    cfg = TINY_UNET if args.tiny else UNetConfig()
    with torch.device(device):
        unet, control = UNetModel(cfg), ControlNet(cfg, ControlConfig())
    unet.requires_grad_(False)  # sd_locked=False: ControlNet + UNet decoder are trained
    for p in unet.decoder_parameters().values():
        p.requires_grad_(True)
    unet.set_gradient_checkpointing(args.checkpointing)
    control.set_gradient_checkpointing(args.checkpointing)
    params = [p for p in [*unet.parameters(), *control.parameters()] if p.requires_grad]
    b, s = args.batch, args.resolution // 8
    g = torch.Generator().manual_seed(1)
    inputs = {"z0": torch.randn(b, 4, s, s, generator=g),
              "mask_hint": (torch.rand(b, 1, 8 * s, 8 * s, generator=g) > 0.5).float().expand(b, 3, 8 * s, 8 * s),
              "image_hint": torch.rand(b, 3, 8 * s, 8 * s, generator=g),
              "context": torch.randn(b, 77, cfg.context_dim, generator=g),
              "t": torch.tensor([T_CYCLE[i % len(T_CYCLE)] for i in range(b)]),
              "noise": torch.randn(b, 4, s, s, generator=g)}
    n_all = sum(p.numel() for p in [*unet.parameters(), *control.parameters()])
    info["train_model"] = (f"UNet + ControlNet (DHI) {n_all / 1e6:.1f} M parameters, "
                           f"{sum(p.numel() for p in params) / 1e6:.1f} M trainable (ControlNet + UNet decoder)")
    info["adamw_fused"] = fused_adamw_supported(device)
    return {"unet": unet, "control": control, "params": params, "schedule": Schedule.from_config().to(device),
            "inputs": {k: v.contiguous().to(device) for k, v in inputs.items()}}


def measure_train(row: Row, variant: str, nets: dict, args: argparse.Namespace, device: torch.device,
                  deadline: float, fused: bool) -> Row:
    unet, control, schedule, inputs = nets["unet"], nets["control"], nets["schedule"], nets["inputs"]
    weights, recipe = LossWeights(), SiameseRecipe(total_steps=TOTAL_STEPS)
    method = SiameseDiffusion(unet, control, schedule, weights, recipe)
    optimizer = torch.optim.AdamW(nets["params"], lr=1e-5, **({"fused": True} if fused else {}))

    def step() -> None:
        with autocast(device, row.precision):
            if variant == "copy-free":
                loss = method.training_loss(inputs["z0"], inputs["mask_hint"], inputs["image_hint"],
                                            inputs["context"], inputs["t"], inputs["noise"], STEP).loss
            else:
                loss, _ = deep_copy_loss(unet, control, schedule, weights, recipe, STEP, **inputs)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        return measure(row, step, device, args, deadline, args.steps, f"train {variant} {args.batch}")
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()


# -- sampling --------------------------------------------------------------------------------------------------------
def build_sample(args: argparse.Namespace, device: torch.device, info: dict) -> dict:
    # Imported here: these pull in omegaconf, open_clip and OpenCV, which the training rows do not need.
    from siamese.config import load_config
    from siamese.factory import build_model

    torch.manual_seed(0)
    config = REPO / "configs" / ("siamese_tiny.yaml" if args.tiny else "siamese_sd15.yaml")
    cfg = load_config(config, [f"data.resolution={args.resolution}"])
    model = build_model(cfg.model, device).eval().requires_grad_(False)
    size, b = cfg.hint_size, args.batch
    g = torch.Generator().manual_seed(2)
    hint = (torch.rand(b, 1, size, size, generator=g) > 0.5).float().expand(b, 3, size, size).contiguous()
    has_solver = "sampler" in inspect.signature(model.sample).parameters
    info["sample_model"] = (f"ControlLDM ({config.name}) {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M "
                            f"parameters, {size}x{size} pairs, cfg {args.cfg}")
    info["sampler_keyword"] = has_solver
    return {"model": model, "hint": hint.to(device), "has_solver": has_solver}


def measure_sample(row: Row, solver: str, steps: int, nets: dict, args: argparse.Namespace, device: torch.device,
                   deadline: float) -> Row:
    model, hint = nets["model"], nets["hint"]
    kwargs = {"sampler": solver} if nets["has_solver"] else {}
    if solver != "ddim" and not nets["has_solver"]:
        row.status = "solver n/a (ControlLDM.sample has no 'sampler' keyword)"
        return row

    def run() -> None:
        with autocast(device, row.precision):
            model.sample(hint, [PROMPT] * len(hint), steps=steps, cfg_scale=args.cfg, **kwargs)

    return measure(row, run, device, args, deadline, args.sample_repeats, f"sample {solver} {steps}",
                   per_step=steps)


# -- main ------------------------------------------------------------------------------------------------------------
def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"


def new_row(item: tuple[str, str, str, str], args: argparse.Namespace) -> Row:
    rid, kind, variant, precision = item
    if kind == "train":
        return Row(rid, f"train {variant}", precision, args.batch, "images/s")
    steps = args.ddim_steps if variant == "ddim" else args.solver_steps
    return Row(rid, f"sample {variant} {steps} steps", precision, args.batch, "pairs/s")


def measure_row(row: Row, kind: str, variant: str, nets: dict, args: argparse.Namespace, device: torch.device,
                deadline: float, fused: bool) -> None:
    """Fills ``row``; an out-of-memory error or any other failure becomes its status, and memory is freed."""
    start = time.monotonic()
    try:
        if kind == "train":
            measure_train(row, variant, nets, args, device, deadline, fused)
        else:
            steps = args.ddim_steps if variant == "ddim" else args.solver_steps
            measure_sample(row, variant, steps, nets, args, device, deadline)
    except OOM_ERROR:
        row.status = "OOM"
    except Exception as exc:  # reported in the table; the other rows still run
        row.status = f"error: {first_line(exc)}"
    free_memory(device)  # after the except blocks: the traceback no longer holds the step's tensors
    row.wall_s = time.monotonic() - start


def run(args: argparse.Namespace, device: torch.device) -> int:
    start = time.monotonic()
    deadline = start + args.budget_s
    name = device_name(device)
    args.peak, source = peak_tflops(name, args.peak_tflops)
    args.flops_seen = {}
    header = {"device": str(device), "device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
              "peak_tflops": args.peak, "peak_source": source, "geometry": "tiny" if args.tiny else "sd15",
              "resolution": args.resolution, "latent": args.resolution // 8, "batch": args.batch,
              "checkpointing": args.checkpointing, "matmul_precision": torch.get_float32_matmul_precision(),
              "steps": args.steps, "warmup": args.warmup, "sample_repeats": args.sample_repeats,
              "budget_s": args.budget_s,
              "memory": ("process resident high-water mark (VmHWM)" if device.type == "cpu"
                         else "max_memory_allocated (tensors: weights, optimizer state, gradients, activations)")}
    rows: list[Row] = []
    notes: list[str] = []
    plan = [item for item in PLAN if not args.only or any(item[0].startswith(o) for o in args.only)]
    longest = 0.0  # the longest row so far: the estimate of what the next one needs
    groups = [[item for item in plan if item[1] == kind] for kind in dict.fromkeys(item[1] for item in plan)]
    for todo in groups:  # PLAN keeps each kind contiguous, so this is the plan's order
        kind, nets = todo[0][1], None
        for item in todo:
            row = new_row(item, args)
            left, need = deadline - time.monotonic(), max(args.min_left_s, 1.2 * longest)
            if left < need:
                row.status = f"skipped: budget ({left:.0f} s left, ~{need:.0f} s needed)"
                notes.append(f"{row.id}: {row.status}")
            else:
                if nets is None:
                    note(f"building the {kind} networks")
                    try:
                        nets = (build_train if kind == "train" else build_sample)(args, device, header)
                    except Exception as exc:  # e.g. OOM or a missing package: this group's rows say so
                        nets = {"error": f"error building the {kind} networks: {first_line(exc)}"}
                        free_memory(device)
                if "error" in nets:
                    row.status = nets["error"]
                else:
                    note(f"measuring {row.id}")
                    measure_row(row, kind, item[2], nets, args, device, deadline, header.get("adamw_fused", False))
                    longest = max(longest, row.wall_s)
                note(f"{row.id}: {row.status}, {fmt_num(row.throughput, '.2f')} {row.unit}, {row.wall_s:.1f} s")
            rows.append(row)
            write_json(args.json, header, rows, notes)  # after every row: a hard kill keeps what was done
        nets = None  # free this group's networks before the next group builds its own
        free_memory(device)
    header["wall_s"] = round(time.monotonic() - start, 1)
    write_json(args.json, header, rows, notes)
    print(markdown(header, rows))
    for line in notes:
        print(f"note: {line}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_device = (str(torch.accelerator.current_accelerator()) if torch.accelerator.is_available() else "cpu")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=default_device, help="torch device (default: the accelerator if any, else cpu)")
    p.add_argument("--tiny", action="store_true", help="CPU-sized geometry (configs/siamese_tiny.yaml) for smoke runs")
    p.add_argument("--json", type=Path, default=None,
                   help="write the header, rows and table here (rewritten after every row)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="total wall budget in s (default %(default)s): the remaining rows are skipped with a note "
                        "when it is nearly spent")
    p.add_argument("--min-left-s", type=float, default=15.0,
                   help="never start a row with less than this left (%(default)s s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--batch", type=int, default=None, help="batch (default 6; 2 with --tiny)")
    p.add_argument("--resolution", type=int, default=None, help="image/hint side, latent = /8 (384; 64 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per row (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed runs per row after the first, FLOP-counted one (default %(default)s)")
    p.add_argument("--sample-repeats", type=int, default=2, help="timed sampled batches per row (default %(default)s)")
    p.add_argument("--ddim-steps", type=int, default=50, help="DDIM steps per sampled batch (default %(default)s)")
    p.add_argument("--solver-steps", type=int, default=20,
                   help="dpmpp_2m steps per sampled batch (default %(default)s)")
    p.add_argument("--cfg", type=float, default=9.0, help="classifier-free guidance scale (default %(default)s)")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                   help="training without gradient checkpointing")
    p.add_argument("--matmul-precision", choices=("highest", "high", "medium"), default="highest",
                   help="torch.set_float32_matmul_precision for the fp32 rows (default %(default)s; "
                        "'high' allows TF32)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=[],
                   help="comma-separated row id prefixes: " + ", ".join(r[0] for r in PLAN))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    args.batch = args.batch or (2 if args.tiny else 6)
    args.resolution = args.resolution or (64 if args.tiny else 384)
    if min(args.batch, args.steps, args.sample_repeats, args.ddim_steps, args.solver_steps) < 1 or args.warmup < 0:
        p.error("--batch, --steps, --sample-repeats, --ddim-steps and --solver-steps must be >= 1, --warmup >= 0")
    factor = 8 * 2 ** (len((TINY_UNET if args.tiny else UNetConfig()).channel_mult) - 1)  # VAE × UNet downsampling
    if args.resolution % factor:
        p.error(f"--resolution {args.resolution} must be a multiple of {factor}")
    unknown = [o for o in args.only if not any(r[0].startswith(o) for r in PLAN)]
    if unknown:
        p.error(f"--only {','.join(unknown)} matches no row ({', '.join(r[0] for r in PLAN)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)  # fails here, in one line, when the backend or device does not exist
    except (RuntimeError, AssertionError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"gpu_suite.py: error: --device {args.device!r} is not usable: {first[:200]}", file=sys.stderr)
        return 2
    if device.type != "cpu" and device.index is not None and hasattr(torch.accelerator, "set_device_index"):
        torch.accelerator.set_device_index(device.index)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    return run(args, device)


if __name__ == "__main__":
    raise SystemExit(main())
