"""Benchmark: activation memory of one Siamese training step with and without checkpointing the hint encoder.

The original code checkpoints the UNet and ControlNet blocks but runs the hint encoder (HI / DHI) outside any
checkpoint, at the full hint resolution, on the stacked [mask; image] batch. This script counts the bytes autograd
keeps for backward (``torch.autograd.graph.saved_tensors_hooks``) during the forward pass of
``SiameseDiffusion.training_loss`` at the SD1.5 geometry, for three settings side by side in one run:

- ``none``: no gradient checkpointing;
- ``blocks``: blocks checkpointed, hint encoder not (the original's ``use_checkpoint: True``);
- ``blocks+hint``: this framework's ``train.gradient_checkpointing`` (the hint encoder recomputed too);

and, with ``--time``, the wall time of forward + backward for the two checkpointed settings. Saved bytes are exact
and device-independent (fp32), so the CPU gives the same numbers as a GPU; time on a CPU is only indicative.

    python bench/hint_memory.py                     # SD1.5, DHI, 384², batch 1 (≈ 1.5 min on 2 CPU cores)
    python bench/hint_memory.py --time              # + forward/backward times (≈ 9 min, 16.7 GB peak RSS)
    python bench/hint_memory.py --hint-encoder hi --resolution 512
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import ldm  # noqa: F401  (torchvision shim first, as everywhere in this project)
from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel

import torch
from torch import Tensor

from cldm.controlnet import ControlConfig, ControlNet
from siamese.losses import LossWeights
from siamese.model import SiameseDiffusion
from siamese.schedules import SiameseRecipe

SETTINGS = ("none", "blocks", "blocks+hint")
MIB = 2**20


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def configure(unet: UNetModel, control: ControlNet, setting: str) -> None:
    unet.set_gradient_checkpointing(setting != "none")
    control.set_gradient_checkpointing(setting != "none")
    control.hint_checkpointing = setting == "blocks+hint"


def saved_bytes(step) -> int:
    total = [0]

    def pack(t: Tensor) -> Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return total[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hint-encoder", choices=("dhi", "hi"), default="dhi")
    p.add_argument("--resolution", type=int, default=384, help="image / hint size (default 384, the paper's)")
    p.add_argument("--batch", type=int, default=1, help="per-GPU batch (saved bytes scale linearly; default 1)")
    p.add_argument("--time", action="store_true", help="also time forward + backward (3 interleaved repeats)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    note("building the SD1.5 UNet and ControlNet")
    cfg = UNetConfig()
    unet, control = UNetModel(cfg), ControlNet(cfg, ControlConfig(hint_encoder=args.hint_encoder))
    for p_ in unet.parameters():
        p_.requires_grad_(False)
    for p_ in unet.decoder_parameters().values():
        p_.requires_grad_(True)
    method = SiameseDiffusion(unet, control, Schedule.from_config(), LossWeights(), SiameseRecipe(total_steps=3000))
    b, r, latent = args.batch, args.resolution, args.resolution // 8
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(b, 1, r, r, generator=g) > 0.5).float().expand(b, 3, r, r).contiguous()
    inputs = {"z0": torch.randn(b, 4, latent, latent, generator=g), "mask_hint": mask,
              "image_hint": torch.rand(b, 3, r, r, generator=g), "context": torch.randn(b, 77, 768, generator=g),
              "t": torch.full((b,), 50), "noise": torch.randn(b, 4, latent, latent, generator=g)}

    def step(backward: bool = True) -> None:
        out = method.training_loss(inputs["z0"], inputs["mask_hint"], inputs["image_hint"], inputs["context"],
                                   inputs["t"], inputs["noise"], 2500)  # late: every term active, t=50 in L_aug
        if backward:
            out.loss.backward()
            for p_ in [*unet.parameters(), *control.parameters()]:
                p_.grad = None

    saved = {}
    for setting in SETTINGS:
        configure(unet, control, setting)
        saved[setting] = saved_bytes(step)
        note(f"{setting}: {saved[setting] / MIB:.0f} MiB kept for backward")
    times: dict[str, list[float]] = {s: [] for s in SETTINGS[1:]}
    if args.time:
        for rep in range(4):
            for setting in SETTINGS[1:] if rep % 2 == 0 else SETTINGS[:0:-1]:
                configure(unet, control, setting)
                start = time.perf_counter()
                step()
                if rep:  # the first round is warm-up
                    times[setting].append(time.perf_counter() - start)
                note(f"round {rep}: {setting} {time.perf_counter() - start:.1f} s")
    print(f"SD1.5 UNet + ControlNet ({args.hint_encoder.upper()}), {r}x{r} hints, latent {latent}x{latent}, batch {b}, "
          f"fp32, all four Siamese terms active; bytes autograd keeps during the forward pass:")
    print(f"{'checkpointing':<13} {'saved MiB':>10} {'vs none':>8}" + (f" {'fwd+bwd s':>10}" if args.time else ""))
    for setting in SETTINGS:
        t = f" {statistics.median(times[setting]):>10.1f}" if args.time and times.get(setting) else ""
        print(f"{setting:<13} {saved[setting] / MIB:>10.0f} {saved[setting] / saved['none']:>7.2f}x" + t)
    print(f"blocks+hint keeps {saved['blocks'] / saved['blocks+hint']:.2f}x less than blocks "
          f"({(saved['blocks'] - saved['blocks+hint']) / MIB:.0f} MiB per batch of {b})")


if __name__ == "__main__":
    main()
