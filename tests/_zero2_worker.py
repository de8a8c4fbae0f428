"""Two-rank DeepSpeed ZeRO-2 run on CPU, started as a subprocess by tests/test_strategy.py.

Usage: ``python tests/_zero2_worker.py OUT_DIR``. Lightning re-launches this same command line for rank 1 (its
subprocess-script launcher), so the script must be runnable on its own and must not depend on pytest. Every rank
trains a tiny model (one frozen layer) for a few steps with ``make_strategy("deepspeed_stage_2", "cpu")``, both ranks
save one ZeRO checkpoint, and each rank writes ``rank{R}.json`` describing what it saw (world size, the size of its
fp32 optimizer partition). Rank 0 also writes its live parameters to ``live.safetensors`` so the test can check the
checkpoint conversion against them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim; must precede pytorch_lightning)

# isort: split
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cldm.strategy import make_strategy

MAX_STEPS = 3


class TinyRegressor(pl.LightningModule):
    """Three Linear layers, the middle one frozen (like the locked UNet next to a trainable ControlNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 16)
        self.frozen = nn.Linear(16, 16)
        self.out = nn.Linear(16, 1)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.frozen(torch.relu(self.inp(x)))))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))
    model = TinyRegressor()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=make_strategy("deepspeed_stage_2", "cpu"),
        max_steps=MAX_STEPS,
        precision=32,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    ckpt = out_dir / "zero2.ckpt"
    trainer.save_checkpoint(str(ckpt), weights_only=False)  # collective: every rank writes its shard
    trainer.strategy.barrier()

    rank = trainer.global_rank
    optimizer = trainer.strategy.deepspeed_engine.optimizer
    partition_numel = sum(int(p.numel()) for p in optimizer.single_partition_of_fp32_groups)
    result = {
        "global_rank": rank,
        "world_size": dist.get_world_size(),
        "trainer_world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "partition_numel": partition_numel,
        "trainable_numel": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "ckpt": str(ckpt),
    }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        live = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(live, str(out_dir / "live.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tests/_zero2_worker.py OUT_DIR")
    main(Path(sys.argv[1]))
