"""Training strategies: Lightning's DeepSpeed ZeRO-2 on GPU, and the same code path on CPU for tests.

The original Siamese-Diffusion code trains with ``strategy="deepspeed_stage_2"`` (sharded optimizer state, ZeRO
checkpoints). Lightning refuses DeepSpeed on anything but CUDA GPUs, although DeepSpeed itself runs ZeRO-2 on its
CPU accelerator over gloo. :class:`CPUDeepSpeedStrategy` lifts exactly the three CUDA assumptions of Lightning's
``DeepSpeedStrategy`` (plus the same device-rank assumption in the inference path) so that real ZeRO-2 code paths
(partitioned optimizer state, ``checkpoint/`` + ``latest`` checkpoint directories, resume) run on CPU machines.
:class:`ZeRO2Strategy` (GPU) and the CPU one save crash-safely: every rank writes into ``step=N.ckpt.partial``, rank
0 writes the completion marker after a barrier and renames the directory, so ``step=N.ckpt`` only ever exists
complete (``cldm.checkpoints``); with ``load_universal`` they resume from a universal checkpoint written by another
number of ranks. :func:`make_strategy` maps a strategy name to what ``Trainer(strategy=...)`` expects.

Written against pytorch-lightning 2.6.6 and deepspeed 0.19.8.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ldm.fileio import swap_dir

from lightning_fabric.plugins import TorchCheckpointIO
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from pytorch_lightning.strategies.deepspeed import remove_module_hooks
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from cldm.checkpoints import PARTIAL_SUFFIX, write_marker

log = logging.getLogger(__name__)

STRATEGY_CHOICES: tuple[str, ...] = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload")
# Lightning accelerator names that mean "run on the host CPU" / "run on an NVIDIA GPU".
_CPU_NAMES = frozenset({"cpu"})
_GPU_NAMES = frozenset({"gpu", "cuda"})
# Lightning precision flags that select DeepSpeed's fp16 (loss-scaled) mode, which has no CPU implementation.
_FP16_PRECISIONS = frozenset({"16-mixed", "16-true"})


def _skip_shm_allreduce_build() -> None:
    """Make DeepSpeed's torch comm backend skip its shared-memory all-reduce op.

    ``deepspeed.comm.torch.TorchBackend.__init__`` JIT-compiles this C++ op (35-45 s of g++ on a fresh machine) the
    first time ``deepspeed.init_distributed`` runs on the CPU accelerator. With ``None`` in its place DeepSpeed falls
    back to plain torch.distributed (gloo) collectives, which is all a CPU test run needs. The patch is process-wide,
    which is why only the CPU strategy applies it (GPU runs never take the shm path anyway).
    """
    import deepspeed.comm.torch  # noqa: F401  (module must be loaded before it can be patched)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints (ddp / single device) written to ``<name>.partial`` and renamed: a job killed while
    saving never leaves a truncated ``step=N.ckpt``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        final = Path(path)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, final)


class ZeRO2Strategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` with crash-safe checkpoint directories and optional universal loading.

    ``save_checkpoint`` is collective (every rank writes its shards): the directory is written under
    ``<name>.partial``, the completion marker (every file and its size) is written by rank 0 once all ranks are
    through a barrier, and the directory is renamed to its final name. A job killed while saving leaves only the
    ``.partial`` directory, which ``find_latest_checkpoint`` never picks and the next save of that name replaces.
    Assumes the checkpoint directory is on a filesystem every rank sees (as DeepSpeed's own shard layout does).
    ``load_universal``: the checkpoint to resume from is a universal checkpoint (``cldm.checkpoints.to_universal``),
    re-partitioned for this run's number of ranks.
    """

    def __init__(self, *args: Any, load_universal: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if load_universal:
            self.config.setdefault("checkpoint", {})["load_universal"] = True

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        final = Path(filepath)
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        if self.is_global_zero and partial.exists():
            shutil.rmtree(partial)  # a save that a crash interrupted earlier
        self.barrier("checkpoint_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint_written")
        if self.is_global_zero:
            write_marker(partial, self.world_size)
            # The same name saved again (a resumed run, the final checkpoint) is replaced whole; a crash in between
            # leaves the old directory where restore_dir (and find_latest_checkpoint) find it.
            swap_dir(partial, final)
        self.barrier("checkpoint_done")


class CPUDeepSpeedStrategy(ZeRO2Strategy):
    """Lightning's ``DeepSpeedStrategy`` without its CUDA-only assumptions, for ZeRO runs on CPU over gloo.

    Supports fp32 and bf16 (``precision=32`` / ``"bf16-mixed"`` / ``"bf16-true"``); fp16 is refused because
    DeepSpeed's loss-scaled fp16 optimizer has no CPU implementation. DeepSpeed's own accelerator must be its CPU
    accelerator (automatic on a machine without GPUs; set ``DS_ACCELERATOR=cpu`` on a GPU machine).
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, skip_shm_build: bool = True, **kwargs: Any) -> None:
        # gloo is the only torch.distributed backend that works for CPU tensors everywhere.
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        self.skip_shm_build = skip_shm_build

    def setup_environment(self) -> None:
        # Replaces DeepSpeedStrategy.setup_environment, whose only addition is the CUDAAccelerator check.
        precision = str(self.precision_plugin.precision)
        if precision in _FP16_PRECISIONS:
            raise ValueError(
                f"precision={precision!r} (fp16) is not supported by DeepSpeed on CPU; use 32 or 'bf16-mixed'."
            )
        from deepspeed.accelerator import get_accelerator

        ds_device = get_accelerator().device_name()
        if ds_device != "cpu":
            raise RuntimeError(
                f"CPUDeepSpeedStrategy needs DeepSpeed's CPU accelerator but DeepSpeed selected {ds_device!r}; "
                "set the environment variable DS_ACCELERATOR=cpu (or use the GPU strategy)."
            )
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # Same as DeepSpeedStrategy.setup_distributed minus `_validate_device_index_selection`: CPU devices carry no
        # index, so Lightning's "device index == local rank" check cannot hold.
        reset_seed()
        self.set_world_ranks()
        if self.skip_shm_build:
            _skip_shm_allreduce_build()
        self._init_deepspeed_distributed()

    def _deepspeed_args(self) -> argparse.Namespace:
        # Lightning passes `root_device.index` (None on CPU, which DeepSpeed compares with `>= 0`); the local rank
        # is what DeepSpeed expects as the device rank.
        return argparse.Namespace(device_rank=self.local_rank)

    def _setup_model_and_optimizer(
        self,
        model: Module,
        optimizer: Optimizer | None,
        lr_scheduler: LRScheduler | ReduceLROnPlateau | None = None,
    ) -> tuple[Any, Optimizer]:
        import deepspeed

        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=self._deepspeed_args(),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    def _initialize_deepspeed_inference(self, model: Module) -> None:
        # Used by trainer.validate/test/predict outside of fit; same device-rank fix as above.
        import deepspeed

        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        if "bf16" in self.config:
            inference_config["bf16"] = self.config["bf16"]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=self._deepspeed_args(),
            config=inference_config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )


def _resolve_accelerator(accelerator: str) -> str:
    """Map a Lightning accelerator name to "cpu" or "gpu" ("auto" picks the GPU when one is usable)."""
    name = accelerator.lower()
    if name in _CPU_NAMES or name in _GPU_NAMES:
        return "cpu" if name in _CPU_NAMES else "gpu"
    if name == "auto":
        from pytorch_lightning.accelerators import CUDAAccelerator

        return "gpu" if CUDAAccelerator.is_available() else "cpu"
    raise ValueError(f"accelerator={accelerator!r} is not supported; expected one of 'cpu', 'gpu', 'cuda', 'auto'.")


def make_strategy(name: str, accelerator: str, *, load_universal: bool = False,
                  exclude_frozen: bool = False) -> str | Strategy:
    """Build the value for ``Trainer(strategy=...)`` from a strategy name and the Trainer's accelerator.

    ``"auto"`` and ``"ddp"`` pass through as Lightning's registered names. ``"deepspeed_stage_2"`` gives
    :class:`CPUDeepSpeedStrategy` (gloo) on CPU and :class:`ZeRO2Strategy` (Lightning's ``DeepSpeedStrategy(stage=2)``,
    NCCL, default bucket sizes, crash-safe saves) on GPU; ``load_universal`` resumes from a universal checkpoint;
    ``exclude_frozen`` leaves frozen parameters out of the checkpoints (they come from ``train.init_ckpt`` again on
    resume: the LightningModule must then load non-strictly).
    ``"deepspeed_stage_2_offload"`` (optimizer state in host memory) is GPU-only: on CPU everything already lives in
    host memory and DeepSpeed's CPU-Adam would need a C++ JIT build.
    """
    if name not in STRATEGY_CHOICES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_CHOICES)}.")
    if name in ("auto", "ddp"):
        return name
    device = _resolve_accelerator(accelerator)
    if name == "deepspeed_stage_2":
        if device == "cpu":
            return CPUDeepSpeedStrategy(stage=2, process_group_backend="gloo", load_universal=load_universal,
                                        exclude_frozen_parameters=exclude_frozen)
        return ZeRO2Strategy(stage=2, load_universal=load_universal, exclude_frozen_parameters=exclude_frozen)
    if device == "cpu":
        raise ValueError(
            f"strategy {name!r} offloads optimizer state to the CPU and is only meaningful on GPU; "
            f"use 'deepspeed_stage_2' with accelerator={accelerator!r}."
        )
    return ZeRO2Strategy(stage=2, offload_optimizer=True, load_universal=load_universal,
                         exclude_frozen_parameters=exclude_frozen)
