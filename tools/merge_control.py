"""``tool_merge_control.py``: overlay trained weights on a base checkpoint → one inference checkpoint.

    python tool_merge_control.py --base models/control_sd15_dhi_ini.safetensors --trained trained.safetensors \\
        --out merged.safetensors
    python tool_merge_control.py --base merged.safetensors --trained trained.safetensors --out shared.safetensors \\
        --only-trainable

BASE is a full checkpoint under the original key names (the output of tool_add_control.py, or any SD1.5 +
ControlNet checkpoint); TRAINED is the output of zero_to_fp32.py, an EMA export (``ema_trainable.safetensors``) or
a file written by ``--only-trainable``. Every trained key must exist in the base with the same shape. The merged
file is checked to load strictly into the model of the config (``--config``, else the one the trained or base file
carries in its metadata) and carries that config in its metadata, so tutorial_inference.py needs no --config, and
the union of both files' provenance (``siamese.provenance``: what the base and the training run were made from).
``--only-trainable`` writes just the trainable set (ControlNet with its hint encoder, plus the UNet decoder unless
``method.sd_locked``) for sharing; merge it onto SD1.5 + control again with this tool. LoRA adapters of a
``method.lora`` run (``X.lora_A.weight`` / ``X.lora_B.weight``) are folded into ``X.weight`` (``W₀ + (α/r)·B·A``):
the output is a plain checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from siamese.config import (
    ConfigError,
    ExperimentConfig,
    checkpoint_metadata,
    checkpoint_provenance,
    config_from_metadata,
    load_config,
)
from tools._cli import add_common_flags, check_output, list_keys, make_parser, run

# torch-backed modules are imported in the functions that use them: --help stays fast
logger = logging.getLogger("siamese.merge_control")


def resolve_config(explicit: Path | None, *checkpoints: Path) -> tuple[ExperimentConfig, str]:
    """``--config`` if given, else the first config a checkpoint carries in its metadata."""
    from ldm.checkpoint import read_metadata

    if explicit is not None:
        return load_config(explicit), str(explicit)
    for path in checkpoints:
        cfg = config_from_metadata(read_metadata(path), str(path))
        if cfg is not None:
            return cfg, f"{path} (metadata)"
    raise ConfigError(f"no config: none of {', '.join(map(str, checkpoints))} carries one in its metadata; "
                      "pass --config")


def trainable_names(cfg: ExperimentConfig) -> list[str]:
    """The trainable parameter names (original layout) of the config's method."""
    from siamese.factory import meta_model

    return meta_model(cfg.model).configure_trainable(cfg.method.sd_locked)


def fold_adapters(trained: dict, base: dict, cfg: ExperimentConfig, cfg_source: str, where: str) -> dict:
    """LoRA adapters of a ``method.lora`` run folded into their weights, ``W = W₀ + (α/r)·B·A`` (cldm/lora.py)."""
    from cldm.lora import fold_lora

    lora = cfg.method.lora
    if not lora.enabled:
        raise ConfigError(f"{where} holds LoRA adapters but the config from {cfg_source} has method.lora disabled; "
                          "pass the run's config.yaml with --config")
    folded = fold_lora(trained, base, lora.scaling)
    count = sum(1 for k in trained if k.endswith(".lora_A.weight"))
    logger.info("folded %d LoRA adapters (rank %d, α/r = %g) into their weights", count, lora.rank, lora.scaling)
    return folded


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("tool_merge_control.py", __doc__)
    p.add_argument("--base", type=Path, required=True, help="full checkpoint to overlay onto")
    p.add_argument("--trained", type=Path, required=True, help="trained weights (zero_to_fp32.py output, EMA, ...)")
    p.add_argument("--out", type=Path, required=True, help="output file (.safetensors, or .ckpt/.pt/.pth)")
    p.add_argument("--only-trainable", action="store_true",
                   help="write only the trainable set (ControlNet + hint encoder + UNet decoder) for sharing")
    p.add_argument("--config", type=Path, help="experiment config (default: from the trained/base metadata)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_common_flags(p)
    return p.parse_args(argv)


def _body(args: argparse.Namespace) -> int:
    from ldm.checkpoint import load_state_dict, save_state_dict

    from cldm.convert import check_against_model, expected_state, merge_weights, select
    from cldm.lora import has_lora
    from siamese.factory import meta_model

    out = check_output(args.out, force=args.force)
    cfg, cfg_source = resolve_config(args.config, args.trained, args.base)
    start = time.perf_counter()
    trained = load_state_dict(args.trained, unsafe_pickle=args.unsafe_pickle)
    base = load_state_dict(args.base, unsafe_pickle=args.unsafe_pickle)
    if has_lora(trained):
        trained = fold_adapters(trained, base, cfg, cfg_source, str(args.trained))
    merged, report = merge_weights(base, trained, base_name=str(args.base), trained_name=str(args.trained))
    del base
    check_against_model(merged, expected_state(meta_model(cfg.model)), f"merged {args.base} + {args.trained}")
    trainable = trainable_names(cfg)
    frozen_changed = [k for k in report.replaced if k not in set(trainable)]
    if frozen_changed:
        logger.warning("%d replaced keys lie outside the trainable set of the config (e.g. %s): the trained "
                       "file changes frozen weights of the base; is --base the checkpoint training started from?",
                       len(frozen_changed), frozen_changed[0])
    list_keys("replaced", report.replaced, args.verbose)
    list_keys("equal to the base", report.same, args.verbose)
    list_keys("rounded (bf16/fp16) copies of base weights, base kept", report.rounded, args.verbose)
    list_keys("ignored base keys dropped", report.dropped, args.verbose)
    kind = "merged"
    if args.only_trainable:
        merged, kind = select(merged, trainable), "trainable"
    # What the merged weights come from: the base's records and the training run's.
    provenance = checkpoint_provenance(args.base).merge(checkpoint_provenance(args.trained))
    metadata = checkpoint_metadata(cfg, kind, provenance, base=args.base.name, trained=args.trained.name)
    save_state_dict(merged, out, metadata=metadata, overwrite=args.force)
    logger.info("wrote %s (%s, %d tensors; config from %s) in %.1f s: %s", out, kind, len(merged), cfg_source,
                time.perf_counter() - start, report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(_body, args)


if __name__ == "__main__":
    raise SystemExit(main())
