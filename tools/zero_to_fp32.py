"""``zero_to_fp32.py``: a training checkpoint (DeepSpeed ZeRO shards) → one fp32 state dict under the model's names.

    python zero_to_fp32.py runs/siamese_sd15/checkpoints/step=3000.ckpt trained.safetensors
    python zero_to_fp32.py runs/siamese_sd15 trained.safetensors          # the run's newest checkpoint

CKPT is a ZeRO checkpoint directory as training writes it (``…/step=N.ckpt/`` with ``latest``, or its tag folder),
a run's ``checkpoints/`` folder or run directory (the newest ``step=N.ckpt`` is taken), or a single-file Lightning
checkpoint (strategy ddp/auto). The output holds every parameter and buffer, trainable and frozen, in float32,
under the original key names (``model.diffusion_model.*``, ``control_model.*``, ...), ready for
``tool_merge_control.py`` or loading directly; the LoRA adapters of a ``method.lora`` run come out as
``X.lora_A.weight`` / ``X.lora_B.weight`` beside ``X.weight`` (the merge folds them in). The run's
``config.yaml`` (or ``--config``) is used to check the keys strictly and is stored in the output's metadata, with the
run's provenance (``siamese.provenance``: ``RUN/provenance.json``, found by walking up from CKPT; a checkpoint
outside a run gets an ``external`` record naming it). The ZeRO files are pickles: each is vetted for foreign Python
objects before DeepSpeed's reader opens it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from siamese.config import ExperimentConfig, checkpoint_metadata, checkpoint_provenance, load_config
from tools._cli import add_common_flags, check_output, make_parser, run

# torch-backed modules are imported in the functions that use them: --help stays fast
logger = logging.getLogger("siamese.zero_to_fp32")
_CONFIG_SEARCH_DEPTH = 3  # step=N.ckpt/checkpoint → step=N.ckpt → checkpoints → run dir


def resolve_checkpoint(path: Path) -> Path:
    """A ZeRO checkpoint directory or file from what the user passed (a run dir picks its newest checkpoint)."""
    from cldm.checkpoints import MARKER, find_latest_checkpoint, incomplete_reason

    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file() or (path / "latest").is_file() or (path / "mp_rank_00_model_states.pt").is_file():
        reason = incomplete_reason(path) if (path / "latest").is_file() else None
        if reason is not None and (path / MARKER).is_file():
            raise ValueError(f"{path} is incomplete ({reason}): convert an earlier checkpoint")
        if reason is not None:
            logger.warning("%s has no completion marker (%s): converting it anyway", path, reason)
        return path
    for folder in (path, path / "checkpoints"):
        newest = find_latest_checkpoint(folder) if folder.is_dir() else None
        if newest is not None:
            logger.info("using the newest checkpoint of %s: %s", path, newest.name)
            return newest
    raise ValueError(f"{path}: neither a ZeRO checkpoint directory (no 'latest' file) nor a folder with "
                     "step=N.ckpt checkpoints")


def find_run_config(ckpt: Path) -> Path | None:
    """The ``config.yaml`` training wrote next to ``checkpoints/`` (searched upwards from the checkpoint)."""
    for folder in list(ckpt.resolve().parents)[:_CONFIG_SEARCH_DEPTH + 1]:
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def read_training_checkpoint(ckpt: Path, *, unsafe_pickle: bool = False) -> dict:
    """The LightningModule's state (``net.*`` names) from a ZeRO directory or a single-file Lightning checkpoint."""
    from ldm.checkpoint import load_state_dict

    from cldm.checkpoints import zero_checkpoint_to_state_dict, zero_pickle_globals

    if ckpt.is_dir():
        return zero_checkpoint_to_state_dict(ckpt, unsafe_pickle=unsafe_pickle)
    # Safe loading, with the numpy RNG state and DeepSpeed types a training checkpoint holds allowed by name.
    return load_state_dict(ckpt, unsafe_pickle=unsafe_pickle, allowed_globals=zero_pickle_globals())


def convert(ckpt: Path, cfg: ExperimentConfig | None, *, unsafe_pickle: bool = False) -> tuple[dict, int]:
    """The fp32 state dict under the model's names (checked strictly against ``cfg`` when given) and the cast
    count."""
    from ldm.checkpoint import compare_keys

    from cldm.convert import (
        IGNORED_PREFIXES,
        OPTIONAL_SUFFIXES,
        check_against_model,
        expected_state,
        to_float32,
        training_to_model_keys,
    )
    from cldm.lora import plain_name, plain_names
    from siamese.factory import meta_training_model

    state = training_to_model_keys(read_training_checkpoint(ckpt, unsafe_pickle=unsafe_pickle), where=str(ckpt))
    state, cast = to_float32(plain_names(state))  # LoRA layers: original names + X.lora_A/B.weight
    if cfg is None:
        return state, cast
    model = meta_training_model(cfg)
    expected = plain_names(expected_state(model))
    if not cfg.method.lora.enabled:
        check_against_model(state, expected, str(ckpt))
        return state, cast
    # A LoRA run's checkpoints hold only the trained parameters (and buffers): all of those, nothing foreign.
    trained = [plain_name(n) for n in model.configure_trainable(cfg.method.sd_locked, cfg.method.lora)]
    report = compare_keys({k: v for k, v in expected.items() if k in state or k in set(trained)}, state,
                          ignore_prefixes=IGNORED_PREFIXES, ignore_suffixes=OPTIONAL_SUFFIXES)
    report.raise_if_bad(f"{ckpt} does not hold the trained parameters of this config's method.lora run")
    return state, cast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("zero_to_fp32.py", __doc__)
    p.add_argument("ckpt", type=Path, metavar="CKPT", help="ZeRO checkpoint directory, run directory or .ckpt file")
    p.add_argument("out", type=Path, metavar="OUT", help="output file (.safetensors, or .ckpt/.pt/.pth)")
    p.add_argument("--config", type=Path, help="experiment config (default: the run's config.yaml)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_common_flags(p)
    return p.parse_args(argv)


def _body(args: argparse.Namespace) -> int:
    from ldm.checkpoint import save_state_dict

    from siamese.run_dir import find_run_provenance

    out = check_output(args.out, force=args.force)
    ckpt = resolve_checkpoint(args.ckpt)
    config_path = args.config or find_run_config(ckpt)
    cfg = load_config(config_path) if config_path else None
    if cfg is None:
        logger.warning("no config.yaml found near %s: keys are not checked against a model (pass --config)", ckpt)
    start = time.perf_counter()
    state, cast = convert(ckpt, cfg, unsafe_pickle=args.unsafe_pickle)
    # The run's record of what it trained on (RUN/provenance.json), else the checkpoint named as an unknown.
    provenance = find_run_provenance(ckpt) or checkpoint_provenance(ckpt)
    metadata = checkpoint_metadata(cfg, "fp32", provenance, source=str(ckpt.name))
    save_state_dict(state, out, metadata=metadata, overwrite=args.force)
    numel = sum(v.numel() for v in state.values())
    logger.info("wrote %s: %d tensors, %.1f M values, float32 (%d cast from lower precision)%s in %.1f s", out,
                len(state), numel / 1e6, cast, f", checked against {config_path}" if cfg else "",
                time.perf_counter() - start)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(_body, args)


if __name__ == "__main__":
    raise SystemExit(main())
