"""DHI hint encoder: channels-last vs channels-first memory for its trunk, forward + backward, side by side.

    python bench/hint_layout.py [--batch 16] [--size 64] [--repeats 7] [--sd15-width]

``DenseHintEncoder.forward`` runs the trunk (convs, SiLU, the patch merges' channels-last LayerNorm; no GroupNorm) in
channels-last memory and returns channels-first. The other arm forces every trunk activation back to channels-first
(forward hooks on the patch merges, a channels-first input): the layout the encoder had before. Both compute the same
function (outputs equal up to float rounding, printed). The arms alternate within each repetition; the median is
reported. The batch of 16 at 64 px is the tiny Siamese step's (the ControlNet runs on [mask; image] hints of a batch
of 8).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm  # noqa: E402,F401

import torch  # noqa: E402

from cldm.hint import DenseHintEncoder, PatchMerge  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--sd15-width", action="store_true", help="zero conv to 320 channels (SD1.5) instead of 32")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = DenseHintEncoder(3, 320 if args.sd15_width else 32)
    for param in encoder.parameters():
        torch.nn.init.normal_(param, std=0.05)
    hint = torch.rand(args.batch, 3, args.size, args.size)

    def channels_first_step() -> torch.Tensor:
        hooks = [m.register_forward_hook(lambda _m, _i, out: out.contiguous())
                 for m in encoder.modules() if isinstance(m, PatchMerge)]
        try:
            out = encoder[1](encoder[0](hint.contiguous())).contiguous()
            out.pow(2).mean().backward()
        finally:
            for hook in hooks:
                hook.remove()
        return out

    def channels_last_step() -> torch.Tensor:
        out = encoder(hint)
        out.pow(2).mean().backward()
        return out

    arms = {"channels-first": channels_first_step, "channels-last (ours)": channels_last_step}
    times: dict[str, list[float]] = {k: [] for k in arms}
    outputs = {}
    for name, fn in arms.items():  # warm-up
        encoder.zero_grad()
        outputs[name] = fn().detach()
    for r in range(args.repeats):
        for name in (list(arms) if r % 2 == 0 else list(reversed(arms))):
            encoder.zero_grad()
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["channels-first"])
    print(f"DHI forward+backward, batch {args.batch}, {args.size}², {args.threads} threads, median of {args.repeats}:")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:22s} {1000 * med:8.1f} ms  ({1000 * min(values):.1f}..{1000 * max(values):.1f})  "
              f"speed-up {base / med:.2f}x")
    diff = (outputs["channels-first"] - outputs["channels-last (ours)"]).abs().max().item()
    print(f"  max |output difference| {diff:.2e} (float rounding of the convolution kernels)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
