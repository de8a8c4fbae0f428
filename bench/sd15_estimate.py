"""What the SD1.5 Siamese recipe needs on GPUs: memory per GPU and time per 3000 steps, ESTIMATED (no GPU run yet).

    python bench/sd15_estimate.py [--batch 6] [--resolution 384] [--tflops 30,100]

Memory per GPU under DeepSpeed ZeRO-2 with N data-parallel ranks is computed from the model's exact parameter counts
(built on the meta device: nothing is allocated) and the activation size measured on CPU by
``bench/hint_memory.py`` (257 MiB per 384² sample kept for backward, fp32, gradient checkpointing on):

* weights: every parameter (fp32: 4 B; DeepSpeed bf16 mode: 2 B);
* optimizer, partitioned over N: AdamW moments (8 B per trainable value), plus the fp32 master copy in bf16 mode;
* gradients, partitioned over N after reduction, plus two reduce/all-gather buckets (Lightning's 2e8 elements);
* activations: per-sample bytes × batch (halved in bf16), plus 1.5 GiB for one block's recomputation, cuDNN
  workspace and the CUDA context.

Time: FLOPs of one training sample counted with ``torch.utils.flop_counter`` on the meta device (the ControlNet
step, the ε forward and the VAE encoder), combined into a Siamese step (2× the ControlNet step for the twin branches,
the VAE encode, one recomputed forward for checkpointing, L_aug on ~20 % of samples), divided by an assumed sustained
throughput per GPU (``--tflops``). Measured numbers replace these as soon as a GPU run exists (bench/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ldm  # noqa: E402,F401  (torchvision shim first)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from siamese.config import load_config  # noqa: E402
from siamese.factory import build_model  # noqa: E402

GIB = 1024 ** 3
ACT_PER_SAMPLE_384 = 257 * 1024 ** 2  # bench/hint_memory.py: kept for backward, fp32, checkpointing on
BUCKET = 2e8  # Lightning DeepSpeedStrategy reduce/allgather bucket sizes (elements)
OVERHEAD = 1.5 * GIB


def memory_gib(total: int, trainable: int, n: int, batch: int, resolution: int, bf16: bool, offload: bool) -> float:
    act = ACT_PER_SAMPLE_384 * (resolution / 384) ** 2 * batch * (0.5 if bf16 else 1.0)
    weights = total * (2 if bf16 else 4)
    optim = 0 if offload else trainable * (8 + (4 if bf16 else 0)) / n
    grads = trainable * (2 if bf16 else 4) / n + 2 * BUCKET * (2 if bf16 else 4)
    return (weights + optim + grads + act + OVERHEAD) / GIB


def flops_per_sample(model, resolution: int) -> dict[str, float]:
    size = resolution // 8
    z = torch.randn(1, 4, size, size, device="meta")
    hint = torch.rand(1, 3, resolution, resolution, device="meta")
    ctx = torch.randn(1, 77, 768, device="meta")
    t = torch.tensor([500], device="meta")
    out = {}
    with FlopCounterMode(display=False) as fc:
        model.eps(z, t, ctx, hint).float().pow(2).mean().backward()
    out["controlnet_step"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eps(z, t, ctx, hint)
    out["eps_forward"] = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.first_stage_model.encode(torch.randn(1, 3, resolution, resolution, device="meta"))
    out["vae_encode"] = fc.get_total_flops()
    out["siamese_step"] = (2 * out["controlnet_step"] + out["vae_encode"] + out["eps_forward"]
                           + 0.2 * out["controlnet_step"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=6)
    p.add_argument("--resolution", type=int, default=384)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--tflops", default="30,100", help="assumed sustained TFLOP/s per GPU (fp32/TF32, bf16)")
    args = p.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "siamese_sd15.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    trainable = sum(model.get_parameter(n).numel() for n in model.configure_trainable(sd_locked=False))
    total = sum(p.numel() for p in model.parameters())
    print(f"parameters: {total / 1e6:.0f} M in all, {trainable / 1e6:.0f} M trainable (sd_locked=false)")
    print(f"\nESTIMATED memory per GPU (GiB), batch {args.batch} per GPU, {args.resolution}², ZeRO-2:")
    print("| GPUs | fp32 | bf16-mixed | fp32 + optimizer offload | bf16 + optimizer offload |")
    print("|---|---|---|---|---|")
    for n in (1, 2, 4, 8):
        cells = [memory_gib(total, trainable, n, args.batch, args.resolution, bf16, off)
                 for off in (False, True) for bf16 in (False, True)]
        print(f"| {n} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    f = flops_per_sample(model, args.resolution)
    print("\nFLOPs per sample: " + ", ".join(f"{k} {v / 1e12:.2f} T" for k, v in f.items()))
    samples = args.batch * args.steps
    fp32_tf, bf16_tf = (float(x) for x in args.tflops.split(","))
    print(f"\nESTIMATED time for {args.steps} steps at batch {args.batch} per GPU (any number of GPUs: each does the "
          f"same per-GPU work): {f['siamese_step'] * samples / (fp32_tf * 1e12) / 3600:.1f} h at {fp32_tf:.0f} "
          f"TFLOP/s (fp32/TF32), {f['siamese_step'] * samples / (bf16_tf * 1e12) / 3600:.1f} h at {bf16_tf:.0f} "
          "TFLOP/s (bf16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
