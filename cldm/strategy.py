"""Training strategies: Lightning's DeepSpeed ZeRO-2 on GPU, and the same code path on CPU for tests.

The original Siamese-Diffusion code trains with ``strategy="deepspeed_stage_2"`` (sharded optimizer state, ZeRO
checkpoints). Lightning refuses DeepSpeed on anything but CUDA GPUs, although DeepSpeed itself runs ZeRO-2 on its
CPU accelerator over gloo. :class:`CPUDeepSpeedStrategy` lifts exactly the three CUDA assumptions of Lightning's
``DeepSpeedStrategy`` (plus the same device-rank assumption in the inference path) so that real ZeRO-2 code paths
(partitioned optimizer state, ``checkpoint/`` + ``latest`` checkpoint directories, resume) run on CPU machines.
:func:`make_strategy` maps a strategy name to what ``Trainer(strategy=...)`` expects, and
:func:`zero_checkpoint_to_state_dict` turns a Lightning ZeRO checkpoint directory back into the LightningModule's own
state dict with DeepSpeed's ``zero_to_fp32`` reader.

Written against pytorch-lightning 2.6.6 and deepspeed 0.19.8.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
from pathlib import Path
from typing import Any

from ldm.checkpoint import foreign_globals

import torch
from lightning_fabric.utilities.seed import reset_seed
from pytorch_lightning.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from pytorch_lightning.strategies.deepspeed import remove_module_hooks
from torch.nn import Module
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

log = logging.getLogger(__name__)

STRATEGY_CHOICES: tuple[str, ...] = ("auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload")
# Lightning accelerator names that mean "run on the host CPU" / "run on an NVIDIA GPU".
_CPU_NAMES = frozenset({"cpu"})
_GPU_NAMES = frozenset({"gpu", "cuda"})
# Lightning precision flags that select DeepSpeed's fp16 (loss-scaled) mode, which has no CPU implementation.
_FP16_PRECISIONS = frozenset({"16-mixed", "16-true"})
# Prefix Lightning 1.x put in front of every key (``LightningDeepSpeedModule`` wrapper); 2.x no longer does.
_WRAPPER_PREFIX = "_forward_module."


def _skip_shm_allreduce_build() -> None:
    """Make DeepSpeed's torch comm backend skip its shared-memory all-reduce op.

    ``deepspeed.comm.torch.TorchBackend.__init__`` JIT-compiles this C++ op (35-45 s of g++ on a fresh machine) the
    first time ``deepspeed.init_distributed`` runs on the CPU accelerator. With ``None`` in its place DeepSpeed falls
    back to plain torch.distributed (gloo) collectives, which is all a CPU test run needs. The patch is process-wide,
    which is why only the CPU strategy applies it (GPU runs never take the shm path anyway).
    """
    import deepspeed.comm.torch  # noqa: F401  (module must be loaded before it can be patched)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
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


def make_strategy(name: str, accelerator: str) -> str | Strategy:
    """Build the value for ``Trainer(strategy=...)`` from a strategy name and the Trainer's accelerator.

    ``"auto"`` and ``"ddp"`` pass through as Lightning's registered names. ``"deepspeed_stage_2"`` gives
    :class:`CPUDeepSpeedStrategy` (gloo) on CPU and Lightning's own ``DeepSpeedStrategy(stage=2)`` (NCCL, default
    bucket sizes) on GPU. ``"deepspeed_stage_2_offload"`` (optimizer state in host memory) is GPU-only: on CPU
    everything already lives in host memory and DeepSpeed's CPU-Adam would need a C++ JIT build.
    """
    if name not in STRATEGY_CHOICES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGY_CHOICES)}.")
    if name in ("auto", "ddp"):
        return name
    device = _resolve_accelerator(accelerator)
    if name == "deepspeed_stage_2":
        if device == "cpu":
            return CPUDeepSpeedStrategy(stage=2, process_group_backend="gloo")
        return DeepSpeedStrategy(stage=2)
    if device == "cpu":
        raise ValueError(
            f"strategy {name!r} offloads optimizer state to the CPU and is only meaningful on GPU; "
            f"use 'deepspeed_stage_2' with accelerator={accelerator!r}."
        )
    return DeepSpeedStrategy(stage=2, offload_optimizer=True)


def _locate_zero_checkpoint(path: Path) -> tuple[Path, str]:
    """Return (directory holding ``latest``, tag) for a Lightning/DeepSpeed ZeRO checkpoint path.

    Lightning's ``epoch=E-step=S.ckpt`` is a directory with a ``latest`` file (holding the tag, "checkpoint") and
    the tag folder with ``mp_rank_00_model_states.pt`` and one ``*_optim_states.pt`` per data-parallel rank. The
    tag folder itself is accepted too.
    """
    if not path.exists():
        raise FileNotFoundError(f"ZeRO checkpoint {str(path)!r} does not exist.")
    if not path.is_dir():
        raise ValueError(
            f"{str(path)!r} is a file, not a ZeRO checkpoint directory (expected a directory with 'latest' and a tag "
            "folder, as written by DeepSpeedStrategy)."
        )
    latest = path / "latest"
    if latest.is_file():
        root, tag = path, latest.read_text().strip()
    elif (path / "mp_rank_00_model_states.pt").is_file():
        root, tag = path.parent, path.name
    else:
        raise ValueError(
            f"{str(path)!r} is not a ZeRO checkpoint directory: expected a 'latest' file or "
            "'mp_rank_00_model_states.pt' in it."
        )
    tag_dir = root / tag
    if not (tag_dir / "mp_rank_00_model_states.pt").is_file() or not any(tag_dir.glob("*_optim_states.pt")):
        raise ValueError(
            f"ZeRO checkpoint {str(tag_dir)!r} is incomplete: expected 'mp_rank_00_model_states.pt' and "
            "'*_optim_states.pt' files."
        )
    return root, tag


# Every global that DeepSpeed / Lightning checkpoints of this framework pickle beyond torch's safe set: numpy RNG
# states, DeepSpeed's loss scaler, ZeRO stage enum and fragment addresses. Anything else is refused by default.
ZERO_PICKLE_GLOBALS = frozenset({
    "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.dtypes.UInt32DType", "numpy.dtypes.Int64DType", "numpy.dtypes.Float64DType",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


def zero_pickle_globals() -> list[Any]:
    """The objects named in ``ZERO_PICKLE_GLOBALS`` that this installation has (for ``weights_only`` loading)."""
    found = []
    for name in sorted(ZERO_PICKLE_GLOBALS):
        module, _, attr = name.rpartition(".")
        try:
            found.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # e.g. numpy 1.x has no numpy._core; deepspeed renamed a class
            continue
    return found


def zero_checkpoint_to_state_dict(ckpt_dir: str | Path, *, unsafe_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Consolidate a ZeRO-2/3 checkpoint directory into the LightningModule's state dict (CPU tensors).

    Accepts Lightning's ``.../epoch=E-step=S.ckpt/`` directory (or its tag folder). Trainable parameters come back
    as the optimizer's fp32 master weights (exactly the live values under fp32 training); frozen parameters and
    buffers are included in the dtype the module held them in (bf16 under DeepSpeed's bf16 precision). A
    ``_forward_module.`` prefix (Lightning 1.x checkpoints) is stripped. DeepSpeed's reader fully unpickles the
    files, so each is vetted first: a file that would import anything beyond ``ZERO_PICKLE_GLOBALS`` is refused
    unless ``unsafe_pickle`` (for a file you trust).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = _locate_zero_checkpoint(Path(ckpt_dir))
    if not unsafe_pickle:
        for path in sorted((root / tag).glob("*.pt")):
            foreign = foreign_globals(path, ZERO_PICKLE_GLOBALS)
            if foreign:
                raise ValueError(f"{path}: would import {', '.join(foreign[:5])} when unpickled, which a ZeRO "
                                 "checkpoint never needs; if you trust this file, pass --unsafe-pickle")
    # DeepSpeed's converter print()s progress; keep library output in logging instead.
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    log.debug("zero_to_fp32 on %s: %s", root, captured.getvalue().strip())
    return {
        (key[len(_WRAPPER_PREFIX) :] if key.startswith(_WRAPPER_PREFIX) else key): value for key, value in state.items()
    }
