"""Resume a run on the given number of ranks without training, and dump the restored optimizer state.

Usage: ``python tests/_resume_worker.py RUN DEVICES OUT.safetensors``, started as a subprocess by
tests/test_run_dir.py (Lightning re-launches this command line for the other ranks). The run is resumed through the
real ``tools.train.train`` with its own config (``total_steps`` = the checkpoint's step, so no step is taken); every
rank then gathers each trainable parameter's fp32 master value and AdamW moments with DeepSpeed's
``safe_get_full_*`` (collective), and rank 0 writes them as ``NAME/fp32``, ``NAME/exp_avg``, ``NAME/exp_avg_sq``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim; must precede pytorch_lightning)

# isort: split
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import save_file

from siamese.run_dir import resume_config, resume_target
from tools.train import train


def main(run: Path, devices: int, out: Path) -> None:
    run, ckpt = resume_target(str(run), run)
    step = int(ckpt.name.split("=")[1].split(".")[0].split("-")[0])
    cfg, changes = resume_config(run, [f"train.devices={devices}", f"train.total_steps={step}"])
    trainer = train(cfg, resume=ckpt, changes=changes)
    state = {}
    for name, param in trainer.lightning_module.named_parameters():
        if param.requires_grad:
            state[f"{name}/fp32"] = safe_get_full_fp32_param(param).detach().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                state[f"{name}/{key}"] = safe_get_full_optimizer_state(param, key).detach().clone()
    if trainer.is_global_zero:
        save_file({k: v.contiguous() for k, v in state.items()}, str(out))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
