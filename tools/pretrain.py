"""``python -m tools.pretrain``: train a base model (first stage, then the text-conditioned UNet) on unlabelled images.

    python -m tools.pretrain --config configs/base_tiny.yaml --out models/base_tiny.safetensors        # CPU, minutes
    python -m tools.pretrain --config configs/base_sd15.yaml data.root=/data/unlabelled \\
        train.init_ckpt=v1-5-pruned.ckpt train.devices=8 --out models/base_domain.safetensors       # domain SD1.5
    python -m tools.pretrain --config configs/base_tiny.yaml --resume latest                         # continue

Stage 1 (``autoencoder``) trains the AutoencoderKL on the images (L1 + KL, optional perceptual term from a local VGG16
file), then sets ``model.first_stage.scale_factor`` to 1/std of its latents. Stage 2 (``unet``) trains the whole
UNet with the ε-prediction loss on the frozen first stage and text encoder (prompt dropout for classifier-free
guidance). Both run through the training machinery of ``tutorial_train.py`` (Lightning, DeepSpeed ZeRO-2, progress
bar, checkpoints, ``--resume latest``) in ``<train.output_dir>/autoencoder`` and ``.../unet``; a finished stage is
skipped on a re-run. ``train.init_ckpt`` (e.g. SD1.5 itself) initialises whatever parts it holds; a stage can be
run alone with ``--stage``.

The output holds SD1.5's key layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``, schedule buffers) and the resolved config (with the calibrated scale
factor) in its metadata: ``tool_add_control.py`` takes it exactly as it takes ``v1-5-pruned.ckpt``. Each stage's run
folder records what it is made from (``provenance.json``: ``train.init_ckpt``'s records, stage 1's for stage 2, and
every image, or image and mask, it trains on by digest); ``autoencoder.safetensors`` and the base carry it in their
metadata (``siamese.provenance``), so every model made from the base inherits it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.fileio import copy_file_atomic

from cldm.settings import FIRST_STAGE_PREFIX
from siamese.config import (
    PRETRAIN_STAGES,
    ConfigError,
    ExperimentConfig,
    checkpoint_metadata,
    checkpoint_provenance,
    config_from_metadata,
    load_config,
    stage_config,
    to_yaml,
)
from siamese.data.provenance import Provenance
from tools._cli import add_common_flags, check_output, make_parser, run

if TYPE_CHECKING:
    import torch
    from torch.utils.data import Dataset

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.pretrain")
STAGE_FILES = {"autoencoder": "autoencoder.safetensors", "unet": "base.safetensors"}


def stage_result(cfg: ExperimentConfig, stage: str) -> Path:
    """Where a finished stage leaves its consolidated weights (its presence marks the stage done)."""
    return Path(cfg.train.output_dir) / STAGE_FILES[stage]


def stage_run(stage_cfg: ExperimentConfig, resume: str | None, force: bool) -> tuple[str | None, bool]:
    """(resume, force) for one stage: ``--resume latest`` continues a stage that has a checkpoint and starts one that
    has none (a stage killed before its first checkpoint starts over)."""
    from tools.train import checkpoint_dir, find_latest_checkpoint

    has_checkpoint = find_latest_checkpoint(checkpoint_dir(stage_cfg), warn=False) is not None
    if resume and not has_checkpoint:
        return None, True
    return (resume if has_checkpoint else None), force


def init_provenance(cfg: ExperimentConfig) -> Provenance:
    """The records of ``train.init_ckpt`` (an SD1.5 release: one ``external`` record), or none without one."""
    return checkpoint_provenance(cfg.train.init_ckpt) if cfg.train.init_ckpt else Provenance()


def stage_provenance(stage_cfg: ExperimentConfig, parents: Provenance, dataset: Dataset) -> Provenance:
    """What a stage's weights are made from: its parents' records and a ``trained`` record of the data it trains on
    (every image, and every mask for the masked losses, by digest)."""
    return parents.merge(dataset.provenance_record(f"base pretraining run {stage_cfg.train.output_dir}"))


def finished_provenance(stage_cfg: ExperimentConfig, parents: Provenance,
                        dataset: Callable[[], Dataset]) -> Provenance:
    """The record a finished stage's file carries: its run's ``provenance.json`` (written when the stage started),
    else (a run started before provenance was recorded) the stage's parents and data now."""
    from siamese.run_dir import run_provenance

    found = run_provenance(stage_cfg.train.output_dir)
    return found if found is not None else stage_provenance(stage_cfg, parents, dataset())


def _init_weights(cfg: ExperimentConfig, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """``train.init_ckpt`` in the original layout: a single file as it is, a diffusers pipeline folder converted
    (``cldm.convert.load_sd_weights``, as ``tool_add_control.py`` reads it)."""
    from ldm.checkpoint import load_state_dict

    if not cfg.train.init_ckpt:
        return {}
    path = Path(cfg.train.init_ckpt)
    logger.info("initialising from %s", path)
    if path.is_dir():
        from cldm.convert import load_sd_weights

        weights = load_sd_weights(path, unsafe_pickle=unsafe_pickle)
        for note in weights.notes:
            logger.info("  %s", note)
        return weights.state
    return load_state_dict(path, unsafe_pickle=unsafe_pickle)


def consolidated_weights(stage_cfg: ExperimentConfig, prefix: str, *, unsafe_pickle: bool) -> dict[str, torch.Tensor]:
    """The newest checkpoint of a finished stage → fp32 weights under SD1.5 names (optimizer master weights)."""
    from cldm.convert import to_float32, training_to_model_keys
    from tools.train import checkpoint_dir, find_latest_checkpoint
    from tools.zero_to_fp32 import read_training_checkpoint

    ckpt = find_latest_checkpoint(checkpoint_dir(stage_cfg))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir(stage_cfg)}")
    state = training_to_model_keys(read_training_checkpoint(ckpt, unsafe_pickle=unsafe_pickle),
                                   module_prefix=prefix, where=str(ckpt))
    return to_float32(state)[0]


def pretrain_autoencoder(cfg: ExperimentConfig, *, resume: str | None, force: bool,
                         unsafe_pickle: bool) -> tuple[dict[str, torch.Tensor], float]:
    """Stage 1 → (``first_stage_model.*`` weights, calibrated scale factor)."""
    from ldm.autoencoder import AutoencoderKL
    from ldm.checkpoint import filter_prefix, load_strict
    from ldm.perceptual import PerceptualDistance

    import torch

    from cldm.pretrain import AutoencoderModule, latent_scale_factor  # Lightning: imported when training starts
    from siamese.factory import build_first_stage, build_image_dataset
    from tools.train import train

    ae = cfg.pretrain.autoencoder
    stage_cfg = stage_config(cfg, "autoencoder")
    first_stage = build_first_stage(cfg.model.first_stage)
    if not isinstance(first_stage, AutoencoderKL):
        raise ConfigError("model.first_stage.kind is identity: there is no first stage to pretrain (use --stage unet)")
    init = filter_prefix(_init_weights(cfg, unsafe_pickle), FIRST_STAGE_PREFIX)
    if init:
        load_strict(first_stage, init).raise_if_bad(f"{cfg.train.init_ckpt} ({FIRST_STAGE_PREFIX}*)")
    perceptual = PerceptualDistance.from_file(ae.perceptual_weights) if ae.perceptual_weight > 0 else None

    def build(c: ExperimentConfig) -> tuple[AutoencoderModule, Dataset]:
        module = AutoencoderModule(first_stage, lr=c.train.lr, kl_weight=ae.kl_weight, perceptual=perceptual,
                                   perceptual_weight=ae.perceptual_weight)
        return module, build_image_dataset(c)

    stage_resume, stage_force = stage_run(stage_cfg, resume, force)
    provenance = None if stage_resume else stage_provenance(stage_cfg, init_provenance(cfg),
                                                           build_image_dataset(stage_cfg))
    train(stage_cfg, resume=stage_resume, force=stage_force, unsafe_pickle=unsafe_pickle, build=build,
          provenance=provenance)
    weights = consolidated_weights(stage_cfg, "", unsafe_pickle=unsafe_pickle)
    first_stage.load_state_dict(filter_prefix(weights, FIRST_STAGE_PREFIX))
    scale = cfg.model.first_stage.scale_factor
    if ae.calibrate_samples > 0:
        dataset = build_image_dataset(cfg)
        count = min(ae.calibrate_samples, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(count)])
        scale = round(latent_scale_factor(first_stage.eval(), images), 5)
        logger.info("latent scale factor: %.5f (1/std over %d images; SD1.5's is 0.18215)", scale, count)
    return weights, scale


def with_scale(cfg: ExperimentConfig, scale: float) -> ExperimentConfig:
    first_stage = replace(cfg.model.first_stage, scale_factor=scale)
    return replace(cfg, model=replace(cfg.model, first_stage=first_stage))


def _first_stage_result(cfg: ExperimentConfig, unsafe_pickle: bool) -> tuple[dict[str, torch.Tensor], float]:
    """The first stage the UNet stage trains on: stage 1's result, else ``train.init_ckpt``'s VAE."""
    from ldm.checkpoint import load_state_dict, read_metadata

    result = stage_result(cfg, "autoencoder")
    if result.is_file():
        embedded = config_from_metadata(read_metadata(result), str(result))
        scale = embedded.model.first_stage.scale_factor if embedded else cfg.model.first_stage.scale_factor
        return load_state_dict(result), scale
    init = {k: v for k, v in _init_weights(cfg, unsafe_pickle).items() if k.startswith(FIRST_STAGE_PREFIX)}
    if not init and cfg.model.first_stage.kind != "identity":
        raise ConfigError(f"no first stage for the UNet stage: {result} does not exist (run --stage autoencoder) and "
                          "train.init_ckpt is not set")
    return init, cfg.model.first_stage.scale_factor


def unet_dataset(cfg: ExperimentConfig) -> Dataset:
    """What the UNet stage trains on: the masked (MedDiff-FT) losses need image-mask pairs; plain pretraining takes
    any images."""
    from siamese.factory import build_dataset, build_image_dataset

    return build_image_dataset(cfg) if cfg.pretrain.unet.loss_region == "all" else build_dataset(cfg)


def pretrain_unet(cfg: ExperimentConfig, first_stage: dict[str, torch.Tensor], *, resume: str | None, force: bool,
                  unsafe_pickle: bool, parents: Provenance | None = None) -> dict[str, torch.Tensor]:
    """Stage 2 → the whole base model's weights under SD1.5 names (``cfg`` carries the calibrated scale factor);
    ``parents``: the records of what it starts from (init checkpoint, first stage)."""
    from ldm.checkpoint import load_strict

    import torch

    from cldm.convert import check_against_model
    from cldm.pretrain import LatentDiffusionModule  # Lightning: imported when training starts
    from siamese.factory import build_latent_diffusion
    from tools.train import train

    stage_cfg = stage_config(cfg, "unet")
    net = build_latent_diffusion(cfg.model)
    init = {k: v for k, v in _init_weights(cfg, unsafe_pickle).items() if not k.startswith(FIRST_STAGE_PREFIX)}
    init.update(first_stage)
    if init:
        # Whatever the init holds (UNet, text encoder) plus the first stage; schedule buffers come from the config.
        state = net.state_dict()
        unknown = sorted(set(init) - set(state) - {k for k in init if k.startswith("model_ema.")})
        if unknown:
            raise ConfigError(f"{cfg.train.init_ckpt}: {len(unknown)} keys the base model does not have, first "
                              f"{unknown[0]}; is it an SD checkpoint of this geometry?")
        state.update({k: v for k, v in init.items() if k in state and not k.endswith("position_ids")})
        load_strict(net, state).raise_if_bad("base model")

    def build(c: ExperimentConfig) -> tuple[LatentDiffusionModule, Dataset]:
        unet_cfg = cfg.pretrain.unet
        module = LatentDiffusionModule(net, lr=c.train.lr, prompt_dropout=unet_cfg.prompt_dropout,
                                       loss_region=unet_cfg.loss_region)
        return module, unet_dataset(c)

    stage_resume, stage_force = stage_run(stage_cfg, resume, force)
    parents = init_provenance(cfg) if parents is None else parents
    provenance = None if stage_resume else stage_provenance(stage_cfg, parents, unet_dataset(stage_cfg))
    train(stage_cfg, resume=stage_resume, force=stage_force, unsafe_pickle=unsafe_pickle, build=build,
          provenance=provenance)
    weights = consolidated_weights(stage_cfg, "net.", unsafe_pickle=unsafe_pickle)
    with torch.device("meta"):
        expected = build_latent_diffusion(cfg.model).state_dict()
    check_against_model(weights, expected, "pretrained base")
    return weights


def pretrain(cfg: ExperimentConfig, out: Path, stages: tuple[str, ...], *, resume: str | None = None,
             force: bool = False, unsafe_pickle: bool = False) -> Path | None:
    """Run the requested stages (a finished one is skipped unless ``force``); returns the base file when the UNet
    stage ran (or had run)."""
    from ldm.checkpoint import read_metadata, save_state_dict

    from siamese.factory import build_image_dataset

    start = time.perf_counter()
    if "autoencoder" in stages:
        result = stage_result(cfg, "autoencoder")
        if result.is_file() and not force:
            logger.info("stage autoencoder: already done (%s); --force redoes it", result)
        else:
            weights, scale = pretrain_autoencoder(cfg, resume=resume, force=force, unsafe_pickle=unsafe_pickle)
            stage_cfg = stage_config(cfg, "autoencoder")
            provenance = finished_provenance(stage_cfg, init_provenance(cfg), lambda: build_image_dataset(stage_cfg))
            save_state_dict(weights, result, metadata=checkpoint_metadata(with_scale(cfg, scale), "first_stage",
                                                                          provenance), overwrite=True)
            logger.info("stage autoencoder: done, %s", result)
    if "unet" not in stages:
        return None
    result = stage_result(cfg, "unet")
    if result.is_file() and not force:
        logger.info("stage unet: already done (%s); --force redoes it", result)
    else:
        first_stage, scale = _first_stage_result(cfg, unsafe_pickle)
        cfg = with_scale(cfg, scale)
        # What the UNet stage starts from: the init checkpoint and, when stage 1 ran, its first stage.
        first_file = stage_result(cfg, "autoencoder")
        parents = init_provenance(cfg).merge(checkpoint_provenance(first_file) if first_file.is_file() else None)
        weights = pretrain_unet(cfg, first_stage, resume=resume, force=force, unsafe_pickle=unsafe_pickle,
                                parents=parents)
        stage_cfg = stage_config(cfg, "unet")
        provenance = finished_provenance(stage_cfg, parents, lambda: unet_dataset(stage_cfg))
        save_state_dict(weights, result, metadata=checkpoint_metadata(cfg, "base", provenance), overwrite=True)
        logger.info("stage unet: done, %s", result)
    if out.resolve() != result.resolve():
        copy_file_atomic(result, out)
    scale = config_from_metadata(read_metadata(result), str(result)).model.first_stage.scale_factor
    logger.info("base model: %s (%.0f s). Next: python tool_add_control.py %s INIT.safetensors --config CFG "
                "model.first_stage.scale_factor=%s (and the same model.first_stage.scale_factor in the training "
                "config)", out, time.perf_counter() - start, out, scale)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.pretrain", __doc__)
    p.add_argument("--config", type=Path, required=True, help="experiment YAML with a pretrain section "
                                                               "(e.g. configs/base_tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. data.root=DIR")
    p.add_argument("--out", type=Path, help="the base checkpoint (default: <train.output_dir>/base.safetensors)")
    p.add_argument("--stage", choices=("all", *PRETRAIN_STAGES), default="all", help="run one stage only")
    p.add_argument("--resume", metavar="latest", help="continue an interrupted stage from its newest checkpoint")
    p.add_argument("--force", action="store_true", help="redo finished stages and overwrite --out")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, then exit")
    add_common_flags(p)
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may come between and after the options


def _body(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        sys.stdout.write(to_yaml(cfg))
        return 0
    init = Path(cfg.train.init_ckpt) if cfg.train.init_ckpt else None
    if init is not None and not (init.is_file() or (init / "model_index.json").is_file()):
        raise FileNotFoundError(f"train.init_ckpt not found: {init} (expected an SD1.x file, .safetensors/.ckpt, or "
                                "a diffusers pipeline folder with model_index.json)")
    if args.resume not in (None, "latest"):
        raise ConfigError("--resume takes 'latest' here (each stage resumes from its own newest checkpoint)")
    out = args.out or stage_result(cfg, "unet")
    stages = PRETRAIN_STAGES if args.stage == "all" else (args.stage,)
    if "unet" in stages and out.resolve() != stage_result(cfg, "unet").resolve():
        check_output(out, force=args.force)
    pretrain(cfg, out, stages, resume=args.resume, force=args.force, unsafe_pickle=args.unsafe_pickle)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
