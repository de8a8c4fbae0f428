"""Run directories: one run per directory, resumed from its own config, safely, on any number of ranks.

A run directory (``train.output_dir``) holds ``config.yaml`` (the resolved config of the current segment),
``config_history.jsonl`` (one line per segment: when, from which checkpoint, what changed), ``checkpoints/``,
``logs/``, ``images/``, the EMA export, ``provenance.json`` (what the run's weights are made from: its init
checkpoint's records and its training data's, ``siamese.data.provenance``; written when the run starts, kept on
resume) and ``cost.jsonl`` (one line per finished training segment: wall seconds, steps, accelerator, ranks, device
name; ``training_cost`` sums them into CPU or GPU hours). The rules:

* a new run never writes into a directory that holds another one (it is refused; ``--force`` clears the run's own
  files first), so checkpoints, configs and EMA exports of two runs never mix;
* resuming reads the run's own ``config.yaml``; an override applies only where it can take effect on a resumed run
  (``RESUMABLE``: run length, ranks, logging, checkpoint cadence, sampling of the image log), any other changed key
  is refused in one line naming both values;
* the checkpoint is vetted before any loader unpickles it, must be complete, and when it was written by another
  number of data-parallel ranks it is converted once to DeepSpeed's universal format, which the engine
  re-partitions for the new world size (``cldm.checkpoints``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from cldm.checkpoints import find_latest_checkpoint, incomplete_reason, saved_world_size, to_universal, vet_checkpoint
from siamese.config import ConfigError, ExperimentConfig, load_config
from siamese.data.provenance import PROVENANCE_FILE, Provenance, read_provenance

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
HISTORY = "config_history.jsonl"
COST = "cost.jsonl"
UNIVERSAL_DIR = ".universal"
# Keys a resumed run may change: they take effect on the remaining steps without contradicting saved state.
RESUMABLE = frozenset({
    "train.total_steps", "train.devices", "train.num_nodes", "train.log_every", "train.image_log_every",
    "train.checkpoint_every", "train.keep_checkpoints", "data.num_workers", "sample.steps", "sample.eta",
    "sample.cfg_scale", "sample.prompt", "sample.sampler", "sample.cfg_mask", "train.logger", "train.val_every",
    "train.val_masks", "train.val_samples", "train.val_segmenter",
})
# What a run directory's own files are (what --force clears; nothing else in the directory is touched).
RUN_FILES = ("checkpoints", "logs", "images", CONFIG, HISTORY, "ema_trainable.safetensors", UNIVERSAL_DIR,
             PROVENANCE_FILE, COST)


def flatten(cfg: ExperimentConfig) -> dict[str, Any]:
    """The config as ``{dotted.key: value}`` (lists as lists)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
    return out


def changed_keys(old: ExperimentConfig, new: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


# -- a new run ------------------------------------------------------------------------------------------------------
def describe_run(run: Path) -> str | None:
    """What run ``run`` already holds (for messages), or None when it holds none."""
    parts = []
    if (run / CONFIG).is_file():
        parts.append(CONFIG)
    ckpts = sorted((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").is_dir() else []
    if ckpts:
        newest = find_latest_checkpoint(run / "checkpoints", warn=False)
        parts.append(f"{len(ckpts)} checkpoint(s)" + (f", newest {newest.name}" if newest else ""))
    return ", ".join(parts) or None


def prepare_fresh(run: Path, *, force: bool) -> None:
    """A new run may start in ``run``: refuse a directory holding another run unless ``force``, which removes that
    run's own files (``RUN_FILES``) and nothing else."""
    held = describe_run(run)
    if held is None:
        return
    if not force:
        raise ConfigError(f"{run} already holds a run ({held}): pass --resume latest to continue it, --force to "
                          "start over in it, or choose another train.output_dir")
    removed = [name for name in RUN_FILES if (run / name).exists()]
    logger.warning("--force: removing the earlier run's %s from %s", ", ".join(removed), run)
    for name in removed:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()


# -- resuming -------------------------------------------------------------------------------------------------------
def resume_target(resume: str, run_hint: Path) -> tuple[Path, Path]:
    """``--resume`` → (run directory, checkpoint). ``latest``: the newest complete checkpoint of ``run_hint`` (the
    config's ``train.output_dir``); a run directory: its newest complete checkpoint; a checkpoint path: that one
    (complete), in the run directory that holds its ``checkpoints/`` folder."""
    if resume == "latest" or Path(resume).is_dir() and (Path(resume) / CONFIG).is_file():
        run = run_hint if resume == "latest" else Path(resume)
        if not run.is_dir():
            raise ConfigError(f"--resume {resume}: no run directory {run}")
        ckpt = find_latest_checkpoint(run / "checkpoints")
        if ckpt is None:
            raise ConfigError(f"--resume {resume}: no complete checkpoint in {run / 'checkpoints'}")
        return run, ckpt
    ckpt = Path(resume)
    if not ckpt.exists():
        raise ConfigError(f"--resume: checkpoint not found: {resume}")
    reason = incomplete_reason(ckpt)
    if reason is not None:
        raise ConfigError(f"--resume: {ckpt} is incomplete ({reason}); resume from an earlier checkpoint")
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run, ckpt


def resume_config(run: Path, overrides: list[str] | tuple[str, ...]) -> tuple[ExperimentConfig, dict]:
    """The run's own config with ``overrides`` that may change on resume (``RESUMABLE``); any other change is
    refused in one line. Returns the config and the changes ``{key: (old, new)}``."""
    path = run / CONFIG
    if not path.is_file():
        raise ConfigError(f"cannot resume {run}: it has no {CONFIG} (not a run directory of this framework?)")
    here = f"train.output_dir={run}"  # where the run is now (it may have been moved since)
    saved = load_config(path, [here])
    cfg = load_config(path, [*overrides, here])
    changes = changed_keys(saved, cfg)
    refused = [k for k in changes if k not in RESUMABLE]
    if refused:
        key = refused[0]
        old, new = changes[key]
        raise ConfigError(f"{key} is {old!r} in {path} but {new!r} now: it cannot change on resume (the saved "
                          f"optimizer state and recipe depend on it); drop the override, or start a new run in "
                          f"another train.output_dir")
    for key, (old, new) in changes.items():
        logger.info("resume: %s %r → %r", key, old, new)
    return cfg, changes


def record_segment(run: Path, step: int | None, resumed_from: Path | None, changes: dict) -> None:
    """Append this segment to ``config_history.jsonl`` (rank 0)."""
    line = {"segment_started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_step": step or 0,
            "resumed_from": str(resumed_from) if resumed_from else None,
            "changed": {k: list(v) for k, v in changes.items()}}
    run.mkdir(parents=True, exist_ok=True)
    with (run / HISTORY).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def record_cost(run: Path, cfg: ExperimentConfig, seconds: float, from_step: int, to_step: int) -> None:
    """Append a finished training segment to ``cost.jsonl`` (rank 0): its wall seconds, steps, accelerator, ranks,
    device name and CPU threads, so evaluations can state what a generator cost (``training_cost``)."""
    accelerator = planned_accelerator(cfg)
    device = torch.cuda.get_device_name(0) if accelerator == "gpu" and torch.cuda.is_available() else "cpu"
    line = {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 1), "from_step": from_step,
            "to_step": to_step, "accelerator": accelerator, "ranks": planned_world_size(cfg), "device": device,
            "cpu_threads": torch.get_num_threads()}
    run.mkdir(parents=True, exist_ok=True)
    with (run / COST).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


def training_cost(run: str | Path) -> dict | None:
    """A run's recorded training cost summed over its segments: wall seconds, device hours (wall × ranks) per
    accelerator (``cpu_hours``, ``gpu_hours``), steps, devices; None when the run records none (trained before
    ``cost.jsonl`` existed, or interrupted in every segment)."""
    path = Path(run) / COST
    if not path.is_file():
        return None
    try:
        lines = [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines() if text.strip()]
        hours = {"cpu": 0.0, "gpu": 0.0}
        for line in lines:
            kind = "gpu" if line["accelerator"] == "gpu" else "cpu"
            hours[kind] += float(line["seconds"]) * int(line["ranks"]) / 3600
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a cost record of this framework ({exc})") from None
    if not lines:
        return None
    return {"segments": len(lines), "wall_seconds": round(sum(float(line["seconds"]) for line in lines), 1),
            "cpu_hours": round(hours["cpu"], 4), "gpu_hours": round(hours["gpu"], 4),
            "steps": max(int(line["to_step"]) for line in lines),
            "devices": sorted({f"{line['ranks']} × {line['device']}" for line in lines})}


def planned_accelerator(cfg: ExperimentConfig) -> str:
    """``cpu`` or ``gpu`` (``auto``: gpu when CUDA is available)."""
    t = cfg.train
    return t.accelerator if t.accelerator != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")


def planned_world_size(cfg: ExperimentConfig) -> int:
    """Data-parallel ranks this run will have: devices (-1 = all visible) × nodes."""
    t = cfg.train
    accelerator = planned_accelerator(cfg)
    devices = t.devices if t.devices != -1 else (1 if accelerator == "cpu" else max(1, torch.cuda.device_count()))
    return devices * t.num_nodes


def is_first_process() -> bool:
    """The process that runs before Lightning launches the others (global rank 0's)."""
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def loadable_checkpoint(ckpt: Path, run: Path, world_size: int, *, unsafe_pickle: bool,
                        wait_seconds: float = 3600.0) -> tuple[Path, bool]:
    """Vet ``ckpt``; when it was written by another number of ranks, its universal conversion (made once, by the
    first process; the others wait for it). Returns (path to resume from, whether it is universal)."""
    vet_checkpoint(ckpt, unsafe_pickle=unsafe_pickle)
    saved = saved_world_size(ckpt)
    if saved is None or saved == world_size:
        return ckpt, False
    target = run / UNIVERSAL_DIR / ckpt.name
    if is_first_process():
        logger.info("%s was written by %d rank(s), this run has %d: re-partitioning its optimizer state through "
                    "DeepSpeed's universal checkpoint (%s)", ckpt.name, saved, world_size, target)
        try:
            return to_universal(ckpt, target), True
        except Exception as exc:  # DeepSpeed's converter: any failure is reported in one line
            raise ConfigError(f"cannot re-partition {ckpt} from {saved} to {world_size} rank(s) ({exc}); resume "
                              f"with train.devices/num_nodes giving {saved} rank(s)") from None
    deadline = time.monotonic() + wait_seconds
    while not (target / "latest_universal").is_file():
        if time.monotonic() > deadline:
            raise ConfigError(f"waited {wait_seconds:.0f} s for rank 0 to convert {ckpt} for {world_size} ranks")
        time.sleep(2.0)
    return target, True


def run_provenance(run: str | Path) -> Provenance | None:
    """What a run directory's weights are made from (its ``provenance.json``, written when the run started), or None
    for a run started before provenance was recorded."""
    return read_provenance(Path(run))


def find_run_provenance(path: str | Path) -> Provenance | None:
    """The provenance of the run a checkpoint belongs to: walks up from ``RUN/checkpoints/step=N.ckpt[/…]`` (or
    ``RUN`` itself) to the nearest ``provenance.json``, at most four folders up, and stops at the run directory
    (``config.yaml`` beside ``checkpoints/``): a run without its own record is None, never a record of a folder
    above it."""
    path = Path(path).resolve()
    for folder in [path, *path.parents][:5]:
        if (folder / PROVENANCE_FILE).is_file():
            return run_provenance(folder)
        if (folder / CONFIG).is_file() and (folder / "checkpoints").is_dir():
            return None
    return None
