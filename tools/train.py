"""``tutorial_train.py``: train Siamese-Diffusion (or the plain ControlNet baseline) from a YAML config.

    python tutorial_train.py --config configs/siamese_tiny.yaml                      # CPU demo, generated data
    python tutorial_train.py --config configs/siamese_sd15.yaml data.root=data/polyps train.devices=8
    python tutorial_train.py --resume runs/siamese_sd15                     # continue a run (its own config.yaml)
    python tutorial_train.py --resume runs/siamese_sd15 train.devices=4 train.total_steps=4000

The config is validated (unknown keys, wrong types, inconsistent sections) before anything is built; the resolved
config is written to ``<output_dir>/config.yaml``, and a new run's ``<output_dir>/provenance.json`` records what its
weights are made from (the init checkpoint's records and every training image and mask by digest; carried on by
the EMA export, zero_to_fp32.py and tool_merge_control.py). Checkpoints (DeepSpeed ZeRO directories with the default
strategy) go to ``<output_dir>/checkpoints/step=N.ckpt``, each appearing only once complete, with a retention limit.
A directory that holds another run is refused (``--force`` starts over in it). ``--resume RUN|latest|CKPT``
continues from the newest complete checkpoint with the run's own config: run length, ranks, logging and checkpoint
cadence may change (on another number of ranks the ZeRO optimizer state is re-partitioned), anything else is
refused; every checkpoint file is vetted before it is unpickled (``--unsafe-pickle`` for files you trust).
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from siamese.config import (
    ConfigError,
    ExperimentConfig,
    check_same_latents,
    checkpoint_provenance,
    load_config,
    save_config,
    to_yaml,
    with_data_prompt,
)
from siamese.data.provenance import Provenance, external

if TYPE_CHECKING:  # torch and Lightning are imported where they are used, so --help and the config tools stay fast
    import pytorch_lightning as pl
    from torch.utils.data import Dataset

    from cldm.callbacks import MaskValidation
    from cldm.lightning import ControlNetModule, TrainModule

logger = logging.getLogger("siamese.train")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"
_STEP_RE = re.compile(r"step=(\d+)")
__all__ = ["build_module", "check_paths", "checkpoint_dir", "find_latest_checkpoint", "main", "make_trainer", "train"]


def build_module(cfg: ExperimentConfig, *, unsafe_pickle: bool = False) -> ControlNetModule:
    from cldm.lightning import ControlNetModule, TrainSettings
    from siamese.factory import add_adapters, build_model, load_weights
    from siamese.lightning import SiameseModule

    net = build_model(cfg.model)
    if cfg.train.init_ckpt:
        check_same_latents(cfg, cfg.train.init_ckpt, f"train.init_ckpt {cfg.train.init_ckpt}")
        load_weights(net, cfg.train.init_ckpt, unsafe_pickle=unsafe_pickle)
    else:
        logger.warning("train.init_ckpt is null: training from random weights (fine for the tiny demo only)")
    add_adapters(cfg, net)  # LoRA after the base weights: B = 0, so training starts from exactly that model
    net.unet.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    net.control.set_gradient_checkpointing(cfg.train.gradient_checkpointing)
    settings = TrainSettings(lr=cfg.train.lr, sd_locked=cfg.method.sd_locked,
                             prompt_dropout=cfg.method.prompt_dropout, total_steps=cfg.train.total_steps,
                             lora=cfg.method.lora)
    if cfg.method.name == "controlnet":
        return ControlNetModule(net, settings)
    return SiameseModule(net, settings, cfg.method.weights, cfg.method.recipe(cfg.train.total_steps))


def find_latest_checkpoint(directory: Path, *, warn: bool = True) -> Path | None:
    """The newest complete ``step=N.ckpt`` in ``directory`` (``cldm.checkpoints.find_latest_checkpoint``)."""
    from cldm.checkpoints import find_latest_checkpoint as newest

    return newest(directory, warn=warn)


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    return Path(cfg.train.output_dir) / "checkpoints"


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
    from torch.utils.data import default_collate

    return default_collate([dataset[i] for i in range(min(count, len(dataset)))])


def make_loggers(cfg: ExperimentConfig) -> list:
    """CSV metrics in ``logs/`` and/or TensorBoard event files in ``tb/`` (``tensorboard --logdir RUN/tb``)."""
    out, kind = Path(cfg.train.output_dir), cfg.train.logger
    loggers = []
    if kind in ("csv", "both"):
        from pytorch_lightning.loggers import CSVLogger

        loggers.append(CSVLogger(out, name="logs"))
    if kind in ("tensorboard", "both"):
        from pytorch_lightning.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(out, name="tb", default_hp_metric=False))
    return loggers


def validation_callback(cfg: ExperimentConfig) -> MaskValidation:
    """Fixed held-out masks (``train.val_masks``, or generated ones the training never sees) with fixed seeds, scored
    by mask fidelity: Dice of a segmentation of each sample against its mask (``train.val_segmenter``, or the colour
    rule of the generated domain; without either, only the grid is logged)."""
    import numpy as np
    import torch

    from cldm.callbacks import MaskValidation
    from siamese.data.layout import DEFAULT_PROMPT
    from siamese.data.masks import read_mask, resize_mask
    from siamese.data.synthetic import synthetic_pair
    from siamese.evaluation.fidelity import colour_rule, dice, segmenter_rule
    from siamese.sampling import collect_masks

    t, size = cfg.train, cfg.hint_size
    if t.val_masks:
        sources = collect_masks(t.val_masks, default_prompt=cfg.sample.prompt, prompt_override=cfg.data.prompt)
        sources = sources[:t.val_samples]
        masks, prompts = [read_mask(src.path) for src in sources], [src.prompt for src in sources]
    else:
        if cfg.data.root is not None:
            raise ConfigError("train.val_every needs train.val_masks (held-out masks) when data.root is set")
        # Generated held-out masks: a seed the training data (train.seed) never uses.
        masks = [synthetic_pair(i, cfg.data.resolution, seed=t.seed + 1_000_003)[1] for i in range(t.val_samples)]
        prompts = [cfg.data.prompt or DEFAULT_PROMPT] * len(masks)
    hint = torch.from_numpy(np.stack([resize_mask(m, size) for m in masks]).astype(np.float32))[:, None]
    if t.val_segmenter:
        from siamese.evaluation.segmenter import load_segmenter

        model, seg_cfg = load_segmenter(Path(t.val_segmenter))
        segment = segmenter_rule(model, seg_cfg)
    elif cfg.data.root is None:
        segment = colour_rule
    else:
        segment = None
        logger.warning("validation: no train.val_segmenter, so only the sample grid is logged (mask fidelity needs a "
                       "segmenter, e.g. eval/segmenter_real_seed0.safetensors from python -m tools.evaluate)")

    def score(images: list, masks01: list) -> dict[str, float]:
        fitted = [resize_mask(m, image.shape[:2]) for image, m in zip(images, masks01)]
        return {"val/mask_dice": float(np.mean([dice(p, m) for p, m in zip(segment(images), fitted)]))}

    return MaskValidation(t.val_every, Path(t.output_dir) / "images", hint.repeat(1, 3, 1, 1), prompts,
                          cfg.sample.steps, cfg.sample.cfg_scale, t.seed, score if segment else None,
                          sampler=cfg.sample.sampler, cfg_mask=cfg.sample.cfg_mask)


def training_provenance(cfg: ExperimentConfig, dataset: Dataset) -> Provenance:
    """What a fresh run's weights are made from: its init checkpoint's records (``checkpoint_provenance``) and a
    ``trained`` record of its dataset (``provenance_record``: every image and mask by digest)."""
    found = checkpoint_provenance(cfg.train.init_ckpt) if cfg.train.init_ckpt else Provenance()
    record = getattr(dataset, "provenance_record", None)
    what = f"{'ControlNet' if cfg.method.name == 'controlnet' else 'Siamese-Diffusion'} run {cfg.train.output_dir}"
    return found.merge(record(what) if record else external(f"training data of run {cfg.train.output_dir}",
                                                            note=f"a {type(dataset).__name__} without records"))


def provenance_metadata(run: Path) -> Callable[[], dict[str, str]]:
    """The run's provenance as safetensors metadata, read when called (the EMA export, at the end of training)."""
    def metadata() -> dict[str, str]:
        from siamese.run_dir import run_provenance

        found = run_provenance(run)
        return found.to_metadata() if found is not None else {}
    return metadata


def make_trainer(cfg: ExperimentConfig, *, load_universal: bool = False) -> pl.Trainer:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import ModelCheckpoint

    from cldm.callbacks import EMACallback, FinalCheckpoint, StepProgressBar
    from cldm.strategy import AtomicCheckpointIO, make_strategy

    t = cfg.train
    accelerator = t.accelerator if t.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    devices = t.devices if t.devices != -1 else (1 if accelerator == "cpu" else "auto")
    # LoRA runs checkpoint only what they train: the frozen base comes from train.init_ckpt on resume.
    strategy = make_strategy(t.strategy, accelerator, load_universal=load_universal,
                             exclude_frozen=cfg.method.lora.enabled)
    # DeepSpeed writes its own shard directories (made crash-safe by the strategy); single files go through an
    # atomic writer.
    plugins = [] if t.strategy.startswith("deepspeed") else [AtomicCheckpointIO()]
    out = Path(t.output_dir)
    # monitor="step" is the trainer's global step: keeps the newest `keep_checkpoints`, named step=N.ckpt.
    ckpt = ModelCheckpoint(dirpath=checkpoint_dir(cfg), filename="{step}", monitor="step", mode="max",
                           save_top_k=t.keep_checkpoints, every_n_train_steps=t.checkpoint_every,
                           save_on_train_epoch_end=False)
    callbacks: list[pl.Callback] = [ckpt, FinalCheckpoint(checkpoint_dir(cfg), t.checkpoint_every), StepProgressBar()]
    if t.ema.enabled:
        callbacks.append(EMACallback(t.ema.decay, out / "ema_trainable.safetensors", provenance_metadata(out)))
    return pl.Trainer(accelerator=accelerator, devices=devices, num_nodes=t.num_nodes, plugins=plugins,
                      strategy=strategy, precision=t.precision, max_steps=t.total_steps,
                      logger=make_loggers(cfg), log_every_n_steps=t.log_every, callbacks=callbacks,
                      default_root_dir=out, enable_model_summary=False, num_sanity_val_steps=0,
                      use_distributed_sampler=False)  # StepSampler splits the data across ranks itself


def train(cfg: ExperimentConfig, *, resume: str | Path | None = None, force: bool = False,
          unsafe_pickle: bool = False, changes: dict | None = None,
          build: Callable[[ExperimentConfig], tuple[TrainModule, Dataset]] | None = None,
          provenance: Provenance | None = None) -> pl.Trainer:
    """Run training as configured; returns the finished Trainer (its checkpoint callback knows the files).

    ``resume``: a checkpoint (``step=N.ckpt``) or ``"latest"`` (the newest complete one of ``train.output_dir``);
    ``cfg`` is then the run's config (``siamese.run_dir.resume_config``, whose ``changes`` are recorded). Without
    it, ``train.output_dir`` must not hold another run unless ``force``. ``build(cfg) -> (module, dataset)``
    replaces the default (the ControlNet / Siamese module from the config and the training pairs): base
    pretraining runs its stages through this same trainer, checkpointing and resume. A fresh run writes
    ``RUN/provenance.json``: ``provenance`` (what a ``build`` caller's module and data are made from), else its init
    checkpoint's records and its dataset's (``training_provenance``); a resumed run keeps the file it has. The EMA
    export, ``zero_to_fp32.py`` and ``tool_merge_control.py`` carry it on.
    """
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from cldm.callbacks import AtTrainStart, ImageLogger
    from cldm.data_order import StepSampler
    from siamese.data.datasets import MaskImageDataset, dataset_prompts
    from siamese.factory import build_dataset
    from siamese.run_dir import (
        UNIVERSAL_DIR,
        is_first_process,
        loadable_checkpoint,
        planned_world_size,
        prepare_fresh,
        record_cost,
        record_segment,
        resume_target,
    )

    pl.seed_everything(cfg.train.seed, workers=True, verbose=False)
    # The frozen VAE and text encoder stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    run = Path(cfg.train.output_dir)
    ckpt = resume_target("latest", run)[1] if resume == "latest" else (Path(resume) if resume else None)
    if ckpt is None and is_first_process():  # Lightning re-runs this script for the other ranks: not them
        prepare_fresh(run, force=force)
    ckpt_path, universal = (None, False) if ckpt is None else loadable_checkpoint(
        ckpt, run, planned_world_size(cfg), unsafe_pickle=unsafe_pickle)
    if build is None:
        check_paths(cfg)
        module, dataset = build_module(cfg, unsafe_pickle=unsafe_pickle), build_dataset(cfg)
    else:
        module, dataset = build(cfg)
    cfg, said = with_data_prompt(cfg, dataset_prompts(dataset))
    if said and is_first_process():
        logger.info("%s", said)
    if isinstance(dataset, MaskImageDataset):
        dataset.check_pairs()  # every pair's aspect ratio from the file headers: fail now, not an hour in
    if ckpt is None and is_first_process():
        (provenance or training_provenance(cfg, dataset)).write(run)
    if len(dataset) < cfg.train.batch_size:
        raise ConfigError(f"the dataset has {len(dataset)} pairs, fewer than train.batch_size={cfg.train.batch_size}")
    # The data order is a function of (seed, global step): a resumed run continues the interrupted epoch exactly.
    sampler = StepSampler(len(dataset), cfg.train.batch_size, cfg.train.seed)
    # Its own generator: each new iterator draws a worker base seed from it, not from the global RNG (whose state
    # the checkpoint restores; a draw there after restoring would shift every later noise sample).
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed))
    trainer = make_trainer(cfg, load_universal=universal)
    sampler.step_source = lambda: trainer.global_step
    if cfg.train.val_every > 0 and build is None:
        trainer.callbacks.append(validation_callback(cfg))
    if cfg.train.image_log_every > 0:
        trainer.callbacks.append(ImageLogger(cfg.train.image_log_every, Path(cfg.train.output_dir) / "images",
                                             _fixed_samples(dataset, 4), cfg.sample.steps, cfg.sample.cfg_scale,
                                             cfg.train.seed, sampler=cfg.sample.sampler))
    step = _STEP_RE.search(ckpt.name) if ckpt else None

    def record() -> None:  # after a resumed checkpoint restored: a failed resume leaves the run as it was
        save_config(cfg, run / "config.yaml")
        record_segment(run, int(step.group(1)) if step else 0, ckpt, changes or {})

    trainer.callbacks.append(AtTrainStart(record))
    started = time.perf_counter()
    try:
        trainer.fit(module, loader, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    except RuntimeError as exc:
        text = str(exc)
        if ckpt is not None and ("size mismatch" in text or "Missing key" in text or "Unexpected key" in text):
            raise ConfigError(f"{ckpt} does not fit the model of {run / 'config.yaml'} (was the config edited?): "
                              f"{text.strip().splitlines()[0][:300]}") from None
        raise
    if trainer.is_global_zero:  # what this segment cost (RUN/cost.jsonl), for evaluations that weigh it
        record_cost(run, cfg, time.perf_counter() - started, int(step.group(1)) if step else 0, trainer.global_step)
    if universal and trainer.is_global_zero:
        shutil.rmtree(run / UNIVERSAL_DIR, ignore_errors=True)  # converted for this resume only
    return trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tutorial_train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides use dotted keys of the config, e.g. train.lr=2e-5 data.root=DIR.")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="experiment YAML (default: configs/siamese_tiny.yaml, the CPU demo on generated data)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", metavar="RUN|latest|CKPT",
                   help="continue a run (its config.yaml; weights, optimizer, step, RNG, data order) from its newest "
                        "complete checkpoint: a run directory, 'latest' (the config's train.output_dir) or a "
                        "step=N.ckpt; only run length, ranks, logging and checkpoint cadence may be overridden")
    p.add_argument("--force", action="store_true",
                   help="start a new run in a train.output_dir that holds another one (its files are removed)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and print the resolved config, check that data.root and train.init_ckpt exist")
    p.add_argument("--unsafe-pickle", action="store_true",
                   help="allow checkpoints (init or resumed) whose pickles hold arbitrary Python objects: trusted "
                        "files only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may come between and after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        changes: dict = {}
        ckpt = None
        if args.resume:
            from siamese.run_dir import resume_config, resume_target

            hint = Path(load_config(args.config, args.overrides).train.output_dir) if args.resume == "latest" else None
            run, ckpt = resume_target(args.resume, hint or Path("."))
            cfg, changes = resume_config(run, args.overrides)
            logger.info("resuming %s from %s", run, ckpt.name)
        else:
            cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            sys.stdout.write(to_yaml(cfg))
            check_paths(cfg)
            return 0
        trainer = train(cfg, resume=ckpt, force=args.force, unsafe_pickle=args.unsafe_pickle, changes=changes)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        logger.error("%s", exc)
        return 2 if isinstance(exc, ConfigError) else 1
    if trainer.is_global_zero:
        logger.info("done: %d steps; newest checkpoint: %s", trainer.global_step,
                    find_latest_checkpoint(checkpoint_dir(cfg)) or "-")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
