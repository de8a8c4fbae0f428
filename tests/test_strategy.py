"""Tests for cldm.strategy: DeepSpeed ZeRO-2 on CPU (gloo), ZeRO checkpoint conversion, resume, strategy names.

Process-group design: the first in-process ``Trainer.fit`` with the ZeRO strategy creates a torch.distributed /
deepspeed.comm process group (world size 1) that lives until the pytest process exits; later Trainers in this
process reuse it (``deepspeed.init_distributed`` is a no-op once initialised). So every in-process ZeRO run is done
once, by the module-scoped ``zero_runs`` fixture, and the tests only inspect its results. The fixture restores
``os.environ`` afterwards because Lightning exports MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK for DeepSpeed.
Two ranks cannot share the pytest process (Lightning re-launches ``sys.argv`` for rank 1), so that test runs
``tests/_zero2_worker.py`` in a subprocess with a clean environment. (conftest.py imports ``ldm`` first, which the
CPU-only torchvision shim needs before pytorch_lightning is imported.)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from _zero2_worker import TinyRegressor as _WorkerRegressor  # tests/ is on sys.path (rootdir-relative)
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DeepSpeedStrategy
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cldm.checkpoints import zero_checkpoint_to_state_dict
from cldm.strategy import CPUDeepSpeedStrategy, ZeRO2Strategy, make_strategy

WORKER = Path(__file__).with_name("_zero2_worker.py")
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK")

StateDict = dict[str, torch.Tensor]


class TinyRegressor(_WorkerRegressor):
    """The worker's toy module (one frozen layer between two trainable ones), with a validation step."""

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))


def _loader() -> DataLoader:
    # One batch per epoch, unshuffled (the Trainers set use_distributed_sampler=False): every step sees the same
    # tensors in the same order. Multi-batch epochs would not do: in Lightning 2.6.6 a max_steps run resumed from an
    # epoch-end checkpoint replays one batch and then starts a new epoch, so its data order differs from an
    # uninterrupted run's (plain single-device training does the same; it is not a ZeRO effect).
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(4, 4, generator=gen), torch.randn(4, 1, generator=gen)), batch_size=4)


def _snapshot(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _StepSnapshots(pl.Callback):
    """Records the module's state after every optimizer step, keyed by global step."""

    def __init__(self) -> None:
        self.by_step: dict[int, StateDict] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: object) -> None:
        self.by_step[trainer.global_step] = _snapshot(pl_module)


@dataclass
class _Run:
    model: TinyRegressor
    trainer: pl.Trainer
    steps: dict[int, StateDict]
    initial: StateDict


@contextlib.contextmanager
def _restored_environ() -> Iterator[None]:
    """Undo Lightning's os.environ writes (MASTER_ADDR, RANK, ...) so they cannot leak into later tests."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _fit(
    root: Path,
    max_steps: int,
    ckpt_dir: Path | None = None,
    ckpt_path: Path | None = None,
    precision: str | int = 32,
) -> _Run:
    pl.seed_everything(0)
    model = TinyRegressor()
    initial = _snapshot(model)
    snaps = _StepSnapshots()
    callbacks: list[pl.Callback] = [snaps]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=make_strategy("deepspeed_stage_2", "cpu"),
        max_steps=max_steps,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
        use_distributed_sampler=False,
        callbacks=callbacks,
        default_root_dir=str(root),
    )
    trainer.fit(model, _loader(), ckpt_path=str(ckpt_path) if ckpt_path else None)
    return _Run(model, trainer, snaps.by_step, initial)


@dataclass
class _ZeroRuns:
    full: _Run  # uninterrupted 5 steps
    first: _Run  # 3 steps, writes the ZeRO checkpoint
    resumed: _Run  # resumes the checkpoint up to step 5
    ckpt: Path
    converted: StateDict
    first_live: StateDict
    val_loss: float
    val_expected: float


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory: pytest.TempPathFactory) -> _ZeroRuns:
    root = tmp_path_factory.mktemp("zero1")
    with _restored_environ():
        full = _fit(root / "full", 5)
        first = _fit(root / "first", 3, ckpt_dir=root / "ckpt")
        first_live = _snapshot(first.model)
        (ckpt,) = (root / "ckpt").glob("*.ckpt")
        converted = zero_checkpoint_to_state_dict(ckpt)
        resumed = _fit(root / "resumed", 5, ckpt_path=ckpt)
        # trainer.validate outside fit takes DeepSpeed's inference path (its own device-rank fix).
        val_trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=make_strategy("deepspeed_stage_2", "cpu"),
            precision=32,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(root / "val"),
        )
        (metrics,) = val_trainer.validate(resumed.model, _loader(), verbose=False)
        x, y = _loader().dataset.tensors
        with torch.no_grad():
            expected = float(nn.functional.mse_loss(resumed.model(x), y))
    return _ZeroRuns(full, first, resumed, ckpt, converted, first_live, float(metrics["val_loss"]), expected)


def test_zero2_one_rank_trains_and_partitions(zero_runs: _ZeroRuns) -> None:
    run = zero_runs.full
    assert isinstance(run.trainer.strategy, CPUDeepSpeedStrategy)
    assert run.trainer.global_step == 5
    assert torch.distributed.get_backend() == "gloo"
    # The shared-memory all-reduce op was not JIT-built (it would be a C++ module here otherwise).
    import deepspeed.comm.comm as ds_comm

    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
    # ZeRO-2 optimizer really in charge: trainable weights move, the frozen layer does not.
    assert not torch.equal(run.steps[5]["inp.weight"], run.initial["inp.weight"])
    assert torch.equal(run.steps[5]["frozen.weight"], run.initial["frozen.weight"])
    optimizer = run.trainer.strategy.deepspeed_engine.optimizer
    assert type(optimizer).__name__ == "DeepSpeedZeroOptimizer"
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in optimizer.single_partition_of_fp32_groups) >= trainable


def test_zero_checkpoint_converts_exactly(zero_runs: _ZeroRuns) -> None:
    ckpt = zero_runs.ckpt
    assert ckpt.name.endswith("step=3.ckpt") and (ckpt / "latest").read_text().strip() == "checkpoint"
    converted, live = zero_runs.converted, zero_runs.first_live
    assert set(converted) == set(live)  # the module's own names, frozen layer included
    for key, value in live.items():
        assert converted[key].dtype == torch.float32
        assert torch.equal(converted[key], value), key
    # The tag folder itself is accepted too.
    inner = zero_checkpoint_to_state_dict(ckpt / "checkpoint")
    assert all(torch.equal(inner[k], v) for k, v in live.items())


def test_zero_resume_matches_uninterrupted_run(zero_runs: _ZeroRuns) -> None:
    full, first, resumed = zero_runs.full, zero_runs.first, zero_runs.resumed
    assert resumed.trainer.global_step == 5
    assert sorted(resumed.steps) == [4, 5]  # it continued from step 3, it did not start over
    assert all(torch.equal(first.steps[3][k], v) for k, v in full.steps[3].items())
    # Bit-identical weights after steps 4 and 5 need the restored AdamW moments and step count (a fresh AdamW's
    # first update is ~lr * sign(grad), which would differ).
    for step in (4, 5):
        for key, value in full.steps[step].items():
            assert torch.equal(resumed.steps[step][key], value), (step, key)
    assert not torch.equal(full.steps[4]["out.weight"], full.steps[3]["out.weight"])


def test_zero_validate_outside_fit(zero_runs: _ZeroRuns) -> None:
    assert zero_runs.val_loss == pytest.approx(zero_runs.val_expected, rel=1e-6)


def test_zero2_bf16_checkpoint(tmp_path: Path) -> None:
    # DeepSpeed's bf16 mode (Lightning's "bf16-mixed" included) keeps the module in bf16 and fp32 master weights in
    # the ZeRO optimizer: the checkpoint gives the fp32 masters for trainable parameters, bf16 for frozen ones.
    with _restored_environ():
        run = _fit(tmp_path / "run", 2, ckpt_dir=tmp_path / "ckpt", precision="bf16-mixed")
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    converted, live = zero_checkpoint_to_state_dict(ckpt), _snapshot(run.model)
    assert set(converted) == set(live) and live["inp.weight"].dtype == torch.bfloat16
    assert converted["inp.weight"].dtype == torch.float32 and converted["frozen.weight"].dtype == torch.bfloat16
    assert not torch.equal(live["inp.weight"], run.initial["inp.weight"].to(torch.bfloat16))
    for key, value in live.items():
        assert torch.equal(converted[key].to(torch.bfloat16), value), key


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=make_strategy("deepspeed_stage_2", "cpu"),
        precision="16-mixed",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    with pytest.raises(ValueError, match=r"precision='16-mixed' \(fp16\) is not supported by DeepSpeed on CPU"):
        trainer.fit(TinyRegressor(), _loader())


def test_make_strategy_names() -> None:
    assert make_strategy("auto", "cpu") == "auto"
    assert make_strategy("ddp", "gpu") == "ddp"
    cpu = make_strategy("deepspeed_stage_2", "cpu")
    assert isinstance(cpu, CPUDeepSpeedStrategy) and cpu.process_group_backend == "gloo"
    assert cpu.config["zero_optimization"]["stage"] == 2
    gpu = make_strategy("deepspeed_stage_2", "gpu")
    assert type(gpu) is ZeRO2Strategy and gpu.config["zero_optimization"]["stage"] == 2
    assert isinstance(gpu, DeepSpeedStrategy) and "checkpoint" not in gpu.config
    universal = make_strategy("deepspeed_stage_2", "cpu", load_universal=True)
    assert universal.config["checkpoint"] == {"load_universal": True}
    offload = make_strategy("deepspeed_stage_2_offload", "cuda")
    assert offload.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ValueError, match="unknown strategy 'fsdp'; expected one of auto, ddp, deepspeed_stage_2"):
        make_strategy("fsdp", "cpu")
    with pytest.raises(ValueError, match="only meaningful on GPU"):
        make_strategy("deepspeed_stage_2_offload", "cpu")
    with pytest.raises(ValueError, match="accelerator='tpu' is not supported"):
        make_strategy("deepspeed_stage_2", "tpu")


def test_zero_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zero_checkpoint_to_state_dict(tmp_path / "missing.ckpt")
    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file, not a ZeRO checkpoint directory"):
        zero_checkpoint_to_state_dict(plain)
    with pytest.raises(ValueError, match="is not a ZeRO checkpoint directory"):
        zero_checkpoint_to_state_dict(tmp_path)
    (tmp_path / "latest").write_text("checkpoint")
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(ValueError, match="is incomplete"):
        zero_checkpoint_to_state_dict(tmp_path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow  # ~15 s: two cold interpreters (torch + deepspeed + lightning imports) on 2 cores
def test_zero2_two_ranks_subprocess(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["global_rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["trainer_world_size"] == 2 and r["global_step"] == 3 for r in ranks)
    # ZeRO-2: each rank holds only its half of the fp32 master weights / optimizer state.
    trainable = ranks[0]["trainable_numel"]
    assert all(r["partition_numel"] < trainable for r in ranks)
    assert sum(r["partition_numel"] for r in ranks) >= trainable

    ckpt = Path(ranks[0]["ckpt"])
    shards = sorted(p.name for p in (ckpt / "checkpoint").glob("*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    live = load_file(str(tmp_path / "live.safetensors"))
    converted = zero_checkpoint_to_state_dict(ckpt)
    assert set(converted) == set(live) and "frozen.weight" in converted
    for key, value in live.items():
        assert torch.equal(converted[key], value), key
