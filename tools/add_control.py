"""``tool_add_control.py``: build the initial ControlNet checkpoint from Stable Diffusion 1.5 weights.

    python tool_add_control.py v1-5-pruned.ckpt models/control_sd15_dhi_ini.safetensors
    python tool_add_control.py v1-5-pruned.safetensors init.ckpt --config configs/controlnet_sd15.yaml --seed 1

``control_model.*`` is copied from the UNet encoder and middle block (``model.diffusion_model.*``); the hint encoder
(HI or DHI, per the config) is initialised from ``--seed`` and the zero convolutions are exactly zero; all base
weights are carried over (``model_ema.*`` is ignored). Output: safetensors unless the name ends in
.ckpt/.pt/.pth, written atomically, carrying the config in its metadata and the base's provenance
(``siamese.provenance``; an SD1.5 release has none: one ``external`` record naming it).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ldm.checkpoint import load_state_dict, save_state_dict

from cldm.convert import add_control, expected_state, fresh_control_weights
from siamese.config import check_same_latents, checkpoint_metadata, checkpoint_provenance, load_config
from siamese.factory import meta_model
from tools._cli import add_common_flags, check_output, list_keys, make_parser, run

logger = logging.getLogger("siamese.add_control")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "siamese_sd15.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("tool_add_control.py", __doc__)
    p.add_argument("sd_ckpt", type=Path, help="Stable Diffusion 1.x checkpoint (.safetensors, .ckpt, .pt, .pth)")
    p.add_argument("out", type=Path, help="output checkpoint (.safetensors, or .ckpt/.pt/.pth)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. "
                                                                     "model.first_stage.scale_factor=0.5")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="experiment config: model geometry and hint encoder (default: configs/siamese_sd15.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hint encoder's initialisation (default 0)")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    add_common_flags(p)
    return p.parse_intermixed_args(argv)  # KEY=VALUE overrides may follow the options


def _body(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    out = check_output(args.out, force=args.force)
    check_same_latents(cfg, args.sd_ckpt, str(args.sd_ckpt))
    start = time.perf_counter()
    model = meta_model(cfg.model)
    logger.info("reading %s", args.sd_ckpt)
    base = load_state_dict(args.sd_ckpt, unsafe_pickle=args.unsafe_pickle)
    state, report = add_control(base, expected_state(model), fresh_control_weights(model, args.seed),
                                where=str(args.sd_ckpt))
    del base
    for title, keys in (("copied UNet → control_model", report.copied), ("newly initialised", report.initialised),
                        ("carried over from the base", report.carried), ("derived from the config", report.derived),
                        ("ignored", report.ignored)):
        list_keys(title, keys, args.verbose)
    metadata = checkpoint_metadata(cfg, "init", checkpoint_provenance(args.sd_ckpt), source=args.sd_ckpt.name,
                                   seed=str(args.seed))
    save_state_dict(state, out, metadata=metadata, overwrite=args.force)
    logger.info("wrote %s (%d tensors; %s hint encoder, seed %d) in %.1f s: %s", out, len(state),
                cfg.model.control.hint_encoder.upper(), args.seed, time.perf_counter() - start, report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(_body, args)
