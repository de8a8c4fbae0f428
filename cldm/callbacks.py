"""Training callbacks: EMA of the trainable weights, a rank-0 image logger (mask | image | sample), a progress bar
counted in optimizer steps, and the final checkpoint.

The first two touch only the trainable set / a few fixed samples, write files atomically, and keep their own state
in the Lightning checkpoint so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from ldm.checkpoint import save_state_dict
from ldm.fileio import write_bytes_atomic

import cv2
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from torch import Tensor

from cldm.lora import plain_name

logger = logging.getLogger(__name__)


class EMACallback(pl.Callback):
    """Exponential moving average of the trainable parameters (fp32 shadow), exported at the end of training;
    ``metadata`` (a dict, or a callable returning one when the export is written) adds string metadata to the export:
    ``tools.train`` gives the run's provenance this way (cldm knows nothing of what it means)."""

    def __init__(self, decay: float, export_path: str | Path,
                 metadata: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.export_path = Path(export_path)
        self.metadata = metadata
        self.shadow: dict[str, Tensor] = {}

    def extra_metadata(self) -> dict[str, str]:
        found = self.metadata() if callable(self.metadata) else self.metadata
        return {str(k): str(v) for k, v in (found or {}).items()}

    def _trainable(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        net = getattr(pl_module, "net", pl_module)  # names as the model has them (no "net." prefix)
        return {n: p for n, p in net.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._trainable(pl_module)
        if self.shadow:  # restored from a checkpoint
            self.shadow = {n: v.to(params[n].device) for n, v in self.shadow.items()}
        else:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        for name, p in self._trainable(pl_module).items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - self.decay)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.shadow:
            save_state_dict({plain_name(n): v.cpu() for n, v in self.shadow.items()}, self.export_path,
                            metadata={"content": "ema of trainable parameters", "decay": str(self.decay),
                                      **self.extra_metadata()},
                            overwrite=True)
            logger.info("EMA weights written to %s", self.export_path)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": {n: v.cpu() for n, v in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        self.shadow = dict(state_dict["shadow"])


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] or masks in [0, 1] (pass ``images * 2 - 1``) → (B, H, W, 3) uint8 RGB."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB/gray uint8 image atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)
    if not ok:
        raise OSError(f"could not encode image {path}")
    write_bytes_atomic(path, encoded.tobytes(), durable=False)


def due(trainer: pl.Trainer, every: int) -> bool:
    """A periodic rank-0 callback's turn: every ``every`` optimizer steps (0: never), on rank 0 only."""
    return every > 0 and trainer.global_step % every == 0 and trainer.is_global_zero


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode for the block (sampling during training), the previous mode restored afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


class ImageLogger(pl.Callback):
    """Every ``every`` steps, rank 0 asks the module for its image columns on a few fixed samples
    (``TrainModule.image_columns``: mask | real image | sample for ControlNet training, image | reconstruction for
    the first stage, ...) and writes ``<out_dir>/step_<N>.png``, one row per sample."""

    def __init__(self, every: int, out_dir: str | Path, samples: dict, steps: int, cfg_scale: float, seed: int,
                 sampler: str = "ddim"):
        self.every, self.out_dir, self.samples = every, Path(out_dir), samples
        self.steps, self.cfg_scale, self.seed, self.sampler = steps, cfg_scale, seed, sampler

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if not due(trainer, self.every):
            return
        device = pl_module.device
        samples = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.samples.items()}
        generator = torch.Generator(device=device).manual_seed(self.seed)
        with eval_mode(pl_module):
            columns = pl_module.image_columns(samples, steps=self.steps, cfg_scale=self.cfg_scale,
                                              generator=generator, sampler=self.sampler)
        path = self.out_dir / f"step_{step:07d}.png"
        write_png(path, image_grid(columns))
        logger.info("sample grid written to %s", path)


def image_grid(columns: list[Tensor]) -> np.ndarray:
    """Columns of (B, 3, H, W) images in [-1, 1] (sizes may differ: resized to the last column's) → one RGB grid
    with a row per sample."""
    size = columns[-1].shape[-2:]
    resized = [torch.nn.functional.interpolate(c.float(), size=size, mode="nearest" if c.shape[-1] < size[-1]
                                               else "area") if c.shape[-2:] != size else c for c in columns]
    rows = [np.concatenate([to_uint8(c)[i] for c in resized], axis=1) for i in range(columns[-1].shape[0])]
    return np.concatenate(rows, axis=0)


class MaskValidation(pl.Callback):
    """Every ``every`` steps, rank 0 samples the mask branch for fixed held-out masks with fixed seeds, scores the
    images with ``score(images, masks) -> {name: value}`` (mask fidelity; see ``tools/train.py``), logs the scores to
    every logger, and writes ``<out_dir>/val_step_<N>.png`` (mask | sample; also to TensorBoard when it logs)."""

    def __init__(self, every: int, out_dir: str | Path, masks: Tensor, prompts: list[str], steps: int,
                 cfg_scale: float, seed: int, score=None, sampler: str = "ddim", cfg_mask: float | None = None):
        self.every, self.out_dir, self.masks, self.prompts = every, Path(out_dir), masks, prompts
        self.steps, self.cfg_scale, self.seed, self.score = steps, cfg_scale, seed, score
        self.sampler, self.cfg_mask = sampler, cfg_mask  # sampled as tools/inference.py samples (sample.*)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        step = trainer.global_step
        if not due(trainer, self.every):
            return
        hint = self.masks.to(pl_module.device)
        generators = [torch.Generator().manual_seed(self.seed + i) for i in range(len(hint))]
        with eval_mode(pl_module), torch.no_grad():
            images = pl_module.net.sample(hint, self.prompts, steps=self.steps, cfg_scale=self.cfg_scale,
                                          generator=generators, sampler=self.sampler, cfg_mask=self.cfg_mask)
        rgb = to_uint8(images)
        metrics = self.score(list(rgb), [m for m in self.masks[:, 0].numpy().astype(np.uint8)]) if self.score else {}
        for run_logger in trainer.loggers:
            if metrics:
                run_logger.log_metrics(metrics, step=step)
            experiment = getattr(run_logger, "experiment", None)
            if hasattr(experiment, "add_image"):  # TensorBoard
                experiment.add_image("val/mask_sample", image_grid([hint * 2 - 1, images]), step, dataformats="HWC")
        write_png(self.out_dir / f"val_step_{step:07d}.png", image_grid([hint * 2 - 1, images]))
        if metrics:
            logger.info("validation at step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole run in optimizer steps up to ``max_steps``, with rate and time left.

    The recipe counts steps (3000), not epochs; Lightning's own bar restarts every epoch and shows ``Epoch 0/-2``
    when only ``max_steps`` is set. A resumed run's bar starts at its step; the rate counts only the new steps.
    When the output is not a terminal (a log file, CI, ``nohup``), there is no bar: one log line every
    ``max_steps / lines`` steps (and at the last step) with the step, the rate, the time left and the metrics, instead
    of thousands of carriage-return updates.
    """

    def __init__(self, *args, lines: int = 20, interactive: bool | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lines = max(1, int(lines))
        self.interactive = interactive  # None: whether stderr is a terminal
        self._plain: dict | None = None  # non-terminal mode: the state of the log lines

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import sys
        import time

        interactive = sys.stderr.isatty() if self.interactive is None else self.interactive
        if not interactive:
            total = trainer.max_steps if trainer.max_steps > 0 else 0
            self._plain = {"start": time.monotonic(), "from": trainer.global_step, "total": total,
                           "every": max(1, total // self.lines) if total else 50}
            self.disable()
            return
        super().on_train_start(trainer, pl_module)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step
        bar.set_description("steps")
        bar.refresh()

    def on_train_epoch_start(self, trainer: pl.Trainer, *args) -> None:
        pass  # one bar for the run: no reset per epoch

    def _log_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        import time

        state, step = self._plain, trainer.global_step
        if step == state.get("last") or (step % state["every"] and step != state["total"]):
            return
        state["last"] = step
        elapsed = time.monotonic() - state["start"]
        rate = (step - state["from"]) / elapsed if elapsed > 0 else 0.0
        left = f", {(state['total'] - step) / rate / 60:.1f} min left" if rate > 0 and state["total"] else ""
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = " ".join(f"{k}={v}" for k, v in metrics.items())
        total = f"/{state['total']}" if state["total"] else ""
        logger.info("step %d%s (%.2f steps/s%s) %s", step, total, rate, left, shown)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if self._plain is not None:
            if trainer.is_global_zero:
                self._log_line(trainer, pl_module)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if self._should_update(step, bar.total or 0) and not bar.disable:
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plain is None:
            super().on_train_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._plain is not None:
            return
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))


class FinalCheckpoint(pl.Callback):
    """Save ``step=N.ckpt`` when training ends on a step the periodic checkpoints (every ``every`` steps) missed,
    so the last weights are never lost. Collective under DeepSpeed: every rank calls ``save_checkpoint``."""

    def __init__(self, directory: str | Path, every: int):
        self.directory, self.every = Path(directory), every

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every:
            trainer.save_checkpoint(self.directory / f"step={step}.ckpt")


class AtTrainStart(pl.Callback):
    """Run ``fn()`` on rank 0 once training starts, i.e. after a resumed checkpoint was restored: a run directory's
    records (its config, the segment history) are written only when the run really continues."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.fn()
