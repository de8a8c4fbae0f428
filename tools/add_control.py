"""``tool_add_control.py``: build the initial ControlNet checkpoint from Stable Diffusion 1.5 weights.

    python tool_add_control.py v1-5-pruned-emaonly.safetensors models/control_sd15_dhi_ini.safetensors
    python tool_add_control.py stable-diffusion-v1-5/ init.safetensors        # a diffusers folder (model_index.json)
    python tool_add_control.py v1-5-pruned.ckpt init.ckpt --config configs/controlnet_sd15.yaml --seed 1 --unsafe-pickle

SD_CKPT is a single file (.safetensors; .ckpt/.pt/.pth/.bin pickles are read with weights_only, and one holding
Lightning objects needs --unsafe-pickle) in the original layout, full, pruned or EMA-only, fp32 or fp16 (cast to
the model's dtype), or a diffusers pipeline folder (unet/, vae/, text_encoder/: cldm/diffusers_import.py), whose
config files must describe the --config geometry (docs/sd15_weights.md). ``control_model.*`` is copied from the
UNet encoder and middle block (``model.diffusion_model.*``); the hint encoder (HI or DHI, per the config) is
initialised from ``--seed`` and the zero convolutions are exactly zero; all base weights are carried over (the EMA
copy ``model_ema.*`` of a full checkpoint is ignored unless --ema). Output: safetensors unless the name ends in
.ckpt/.pt/.pth, written atomically, carrying the config in its metadata and the base's provenance
(``siamese.provenance``; an SD1.5 release has none: one ``external`` record naming it, for a diffusers folder with
the digests of the weight files read).
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from siamese.config import (
    ConfigError,
    ExperimentConfig,
    check_same_latents,
    checkpoint_metadata,
    checkpoint_provenance,
    load_config,
)
from siamese.data.provenance import Provenance, digest_file, external
from tools._cli import add_common_flags, check_output, list_keys, make_parser, run

if TYPE_CHECKING:
    from cldm.convert import SDWeights

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.add_control")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "siamese_sd15.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("tool_add_control.py", __doc__)
    p.add_argument("sd_ckpt", type=Path, help="Stable Diffusion 1.x weights: one file (.safetensors, .ckpt, .pt, .pth) "
                                              "or a diffusers pipeline folder (model_index.json)")
    p.add_argument("out", type=Path, help="output checkpoint (.safetensors, or .ckpt/.pt/.pth)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. "
                                                                     "model.first_stage.scale_factor=0.5")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="experiment config: model geometry and hint encoder (default: configs/siamese_sd15.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hint encoder's initialisation (default 0)")
    p.add_argument("--ema", action="store_true", help="take the UNet from the EMA copy (model_ema.*) of a full "
                                                      "single-file checkpoint (default: its model.diffusion_model.*)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_common_flags(p)
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may follow the options


def _check_geometry(cfg: ExperimentConfig, weights: SDWeights, where: str) -> None:
    """A diffusers folder states its geometry: it must be the config's (heads and the latent scale factor too)."""
    if weights.geometry is None:
        return
    model = cfg.model
    problems = weights.geometry.mismatches(model.unet, asdict(model.first_stage), model.text_encoder,
                                           asdict(model.schedule))
    if len(problems) == 1 and problems[0].startswith("model.first_stage.scale_factor"):
        factor = weights.geometry.first_stage["scale_factor"]
        raise ConfigError(f"{where}: {problems[0]}: add model.first_stage.scale_factor={factor}")
    if problems:
        raise ConfigError(f"{where}: {len(problems)} settings differ from the config ({'; '.join(problems[:3])}); is "
                          f"--config the right one for this folder?")


def _base_provenance(path: Path, weights: SDWeights) -> Provenance:
    """A file's own record (or one naming it); a diffusers folder: one external record with its weights' digests."""
    if weights.geometry is None:
        return checkpoint_provenance(path)
    digests = ", ".join(f"{f.relative_to(path)} {digest_file(f)}" for f in weights.files)
    return Provenance((external(f"diffusers folder {path.resolve().name}",
                                note=f"no provenance recorded: its training data is unknown to the framework; "
                                     f"weights read (sha256[:16]): {digests}"),))


def _body(args: argparse.Namespace) -> int:
    from ldm.checkpoint import save_state_dict

    from cldm.convert import add_control, expected_state, fresh_control_weights, load_sd_weights
    from siamese.factory import meta_model

    cfg = load_config(args.config, args.overrides)
    out = check_output(args.out, force=args.force)
    check_same_latents(cfg, args.sd_ckpt, str(args.sd_ckpt))
    start = time.perf_counter()
    model = meta_model(cfg.model)
    expected = expected_state(model)
    logger.info("reading %s", args.sd_ckpt)
    weights = load_sd_weights(args.sd_ckpt, expected=expected, unsafe_pickle=args.unsafe_pickle, use_ema=args.ema)
    logger.info("%s: %s", args.sd_ckpt, weights.layout)
    for note in weights.notes:
        logger.info("  %s", note)
    _check_geometry(cfg, weights, str(args.sd_ckpt))
    state, report = add_control(weights.state, expected, fresh_control_weights(model, args.seed),
                                where=str(args.sd_ckpt))
    weights.state.clear()
    for title, keys in (("copied UNet → control_model", report.copied), ("newly initialised", report.initialised),
                        ("carried over from the base", report.carried), ("derived from the config", report.derived),
                        ("ignored", report.ignored)):
        list_keys(title, keys, args.verbose)
    metadata = checkpoint_metadata(cfg, "init", _base_provenance(args.sd_ckpt, weights), source=args.sd_ckpt.name,
                                   seed=str(args.seed), base_layout=weights.layout)
    save_state_dict(state, out, metadata=metadata, overwrite=args.force)
    logger.info("wrote %s (%d tensors; %s hint encoder, seed %d) in %.1f s: %s", out, len(state),
                cfg.model.control.hint_encoder.upper(), args.seed, time.perf_counter() - start, report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(_body, args)


if __name__ == "__main__":
    raise SystemExit(main())
