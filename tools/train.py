"""``tutorial_train.py``: train Siamese-Diffusion (or the plain ControlNet baseline) from a YAML config.

    python tutorial_train.py --config configs/siamese_tiny.yaml                      # CPU demo, generated data
    python tutorial_train.py --config configs/siamese_sd15.yaml data.root=data/polyps train.devices=8
    python tutorial_train.py --config configs/siamese_sd15.yaml --resume latest

The config is validated (unknown keys, wrong types, inconsistent sections) before anything is built; the resolved
config is written to ``<output_dir>/config.yaml``. Checkpoints (DeepSpeed ZeRO directories with the default
strategy) go to ``<output_dir>/checkpoints/step=N.ckpt`` with a retention limit; ``--resume latest`` picks the newest.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset, default_collate

from cldm.callbacks import EMACallback, FinalCheckpoint, ImageLogger, StepProgressBar
from cldm.data_order import StepSampler
from cldm.lightning import ControlNetModule, TrainModule, TrainSettings
from cldm.strategy import make_strategy
from siamese.config import ConfigError, ExperimentConfig, check_same_latents, load_config, save_config, to_yaml
from siamese.data import MaskImageDataset
from siamese.factory import build_dataset, build_model, load_weights
from siamese.lightning import SiameseModule

logger = logging.getLogger("siamese.train")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"
_STEP_RE = re.compile(r"step=(\d+)")


def build_module(cfg: ExperimentConfig, *, unsafe_pickle: bool = False) -> ControlNetModule:
    net = build_model(cfg.model)
    if cfg.train.init_ckpt:
        check_same_latents(cfg, cfg.train.init_ckpt, f"train.init_ckpt {cfg.train.init_ckpt}")
        load_weights(net, cfg.train.init_ckpt, unsafe_pickle=unsafe_pickle)
    else:
        logger.warning("train.init_ckpt is null: training from random weights (fine for the tiny demo only)")
    net.unet.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    net.control.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    settings = TrainSettings(lr=cfg.train.lr, sd_locked=cfg.method.sd_locked,
                             prompt_dropout=cfg.method.prompt_dropout, total_steps=cfg.train.total_steps)
    if cfg.method.name == "controlnet":
        return ControlNetModule(net, settings)
    return SiameseModule(net, settings, cfg.method.weights, cfg.method.recipe(cfg.train.total_steps))


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


def find_latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the highest ``step=N`` in its name (files or ZeRO directories); among equal steps (a run
    resumed from an older checkpoint writes ``step=N-v1.ckpt`` beside ``step=N.ckpt``) the most recently written."""
    found = [(int(m.group(1)), p.stat().st_mtime_ns, p) for p in directory.glob("*.ckpt")
             if (m := _STEP_RE.search(p.name))]
    return max(found)[2] if found else None


def resolve_resume(cfg: ExperimentConfig, resume: str | None) -> str | None:
    if resume is None:
        return None
    if resume == "latest":
        latest = find_latest_checkpoint(checkpoint_dir(cfg))
        if latest is None:
            raise ConfigError(f"--resume latest: no checkpoint in {checkpoint_dir(cfg)}")
        return str(latest)
    if not Path(resume).exists():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    return resume


def check_paths(cfg: ExperimentConfig) -> None:
    """The files a run needs exist (data root, init checkpoint): fail in one line before any model is built."""
    if cfg.data.root is not None:
        root = Path(cfg.data.root)
        if not root.exists():
            raise FileNotFoundError(f"data.root not found: {root}")
        if root.is_dir() and not (root / "prompt.json").is_file():
            raise FileNotFoundError(f"data.root {root} has no prompt.json (make one with python -m tools.prepare_data)")
    if cfg.train.init_ckpt and not Path(cfg.train.init_ckpt).is_file():
        raise FileNotFoundError(f"train.init_ckpt not found: {cfg.train.init_ckpt} (make it with tool_add_control.py)")


def _fixed_samples(dataset: Dataset, count: int) -> dict:
    """The first ``count`` items, collated: the image logger's fixed samples."""
    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


def make_trainer(cfg: ExperimentConfig) -> pl.Trainer:
    t = cfg.train
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    devices = t.devices if t.devices != -1 else (1 if accelerator == "cpu" else "auto")
    out = Path(t.output_dir)
    # monitor="step" is the trainer's global step: keeps the newest `keep_checkpoints`, named step=N.ckpt.
    ckpt = ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="{step}", monitor="step", mode="max",
                           save_top_k=t.keep_checkpoints, every_n_train_steps=t.checkpoint_every,
                           save_on_train_epoch_end=False)
    callbacks: list[pl.Callback] = [ckpt, FinalCheckpoint(checkpoint_dir(cfg), t.checkpoint_every), StepProgressBar()]
    if t.ema.enabled:
        callbacks.append(EMACallback(t.ema.decay, out / "ema_trainable.safetensors"))
    return pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=t.num_nodes,
                      strategy=make_strategy(t.strategy, accelerator), precision=t.precision, max_steps=t.total_steps,
                      logger=CSVLogger(out, name="logs"), log_every_n_steps=t.log_every, callbacks=callbacks,
                      default_root_dir=out, enable_model_summary=False, num_sanity_val_steps=0,
                      use_distributed_sampler=False)  # StepSampler splits the data across ranks itself


def train(cfg: ExperimentConfig, *, resume: str | None = None, unsafe_pickle: bool = False,
          build: Callable[[ExperimentConfig], tuple[TrainModule, Dataset]] | None = None) -> pl.Trainer:
    """Run training as configured; returns the finished Trainer (its checkpoint callback knows the files).

    ``build(cfg) -> (module, dataset)`` replaces the default (the ControlNet / Siamese module from the config and the
    training pairs): base pretraining runs its stages through this same trainer, checkpointing and resume.
    """
    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # The frozen VAE and text encoder stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    ckpt_path = resolve_resume(cfg, resume)
    if build is None:
        check_paths(cfg)
        module, dataset = build_module(cfg, unsafe_pickle=unsafe_pickle), build_dataset(cfg)
    else:
        module, dataset = build(cfg)
    if isinstance(dataset, MaskImageDataset):
        dataset.check_pairs()  # every pair's aspect ratio from the file headers: fail now, not an hour in
    if len(dataset) < cfg.train.batch_size:
        raise ConfigError(f"the dataset has {len(dataset)} pairs, fewer than train.batch_size={cfg.train.batch_size}")
    # The data order is a function of (seed, global step): a resumed run continues the interrupted epoch exactly.
    sampler = StepSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)
    # Its own generator: each new iterator draws a worker base seed from it, not from the global RNG (whose state
    # the checkpoint restores; a draw there after restoring would shift every later noise sample).
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    trainer = make_trainer(cfg)
    sampler.step_source = lambda: trainer.global_step
    if cfg.train.image_log_every > 0:
        trainer.callbacks.append(ImageLogger(cfg.train.image_log_every, Path(cfg.train.output_dir) / "images",
                                             _fixed_samples(dataset, 4), cfg.sample.steps, cfg.sample.cfg_scale,
                                             cfg.train.seed))
    if trainer.is_global_zero:
        save_config(cfg, Path(cfg.train.output_dir) / "config.yaml")
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tutorial_train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides use dotted keys of the config, e.g. train.lr=2e-5 data.root=DIR.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="experiment YAML (default: configs/siamese_tiny.yaml, the CPU demo on generated data)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", metavar="PATH|latest", help="resume from a checkpoint (weights, optimizer, step, RNG)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config, check that data.root and train.init_ckpt exist")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow loading a pickled (.ckpt) init checkpoint with arbitrary objects: trusted files only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            sys.stdout.write(to_yaml(cfg))
            check_paths(cfg)
            return 0
        trainer = train(cfg, resume=args.resume, unsafe_pickle=args.unsafe_pickle)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2 if isinstance(exc, ConfigError) else 1
    if trainer.is_global_zero:
        logger.info("done: %d steps; newest checkpoint: %s", trainer.global_step,
                    find_latest_checkpoint(checkpoint_dir(cfg)) or "-")
    return 0
