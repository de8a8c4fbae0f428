"""``python -m tools.export_diffusers``: a plain-ControlNet (HI) checkpoint → a diffusers ``ControlNetModel`` folder.

    python -m tools.export_diffusers merged.safetensors controlnet_diffusers
    python -m tools.export_diffusers trainable.safetensors controlnet_diffusers --config run/config.yaml --force

CKPT is any checkpoint holding ``control_model.*`` under the original names (the output of tool_merge_control.py,
with or without ``--only-trainable``, or tool_add_control.py's); its config comes from its metadata unless
``--config`` is given. OUT_DIR receives ``config.json`` and ``diffusion_pytorch_model.safetensors`` (whose metadata
carries the checkpoint's provenance, ``siamese.provenance``: what its weights were trained on), what
``diffusers.ControlNetModel.from_pretrained(OUT_DIR)`` reads: the ControlNet alone, to use with an SD1.5 pipeline
(``StableDiffusionControlNetPipeline``) whose UNet, VAE and text encoder come from the same base. The folder is
written under a temporary name beside OUT_DIR and renamed at the end; an existing OUT_DIR is refused without
``--force``, and even with it unless it holds only a previous export (config.json and weights). Only HI (plain
ControlNet) models can be exported: diffusers has no DHI conditioning embedding, and settings it cannot express
exactly (``only_mid_control``, ``control_scale`` ≠ 1, GroupNorm widths not a multiple of 32) are refused with one
line (cldm/diffusers_export.py).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.fileio import replace_dir, write_json_atomic

from cldm.settings import DIFFUSERS_CONFIG_NAME as CONFIG_NAME
from cldm.settings import DIFFUSERS_WEIGHTS_NAME as WEIGHTS_NAME
from siamese.config import checkpoint_metadata, checkpoint_provenance
from tools._cli import add_common_flags, check_output_dir, make_parser, run
from tools.merge_control import resolve_config

if TYPE_CHECKING:
    from torch import Tensor

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.export_diffusers")
# What --force may replace: a folder this tool (or diffusers' save_pretrained) wrote, nothing the user keeps there.
REPLACEABLE = {CONFIG_NAME, WEIGHTS_NAME, "diffusion_pytorch_model.bin"}


def check_replaceable(out: Path) -> None:
    """An existing OUT_DIR is replaced whole: refuse the working directory (or above) and folders with other files."""
    if not out.is_dir():
        return
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise ValueError(f"output {out} is the working directory or one above it; give a new folder name")
    others = sorted(p.name for p in out.iterdir() if p.name not in REPLACEABLE)
    if others:
        raise FileExistsError(f"output {out} holds other files ({', '.join(others[:3])}); not replacing it, even "
                              "with --force: give a new folder name")


def write_folder(out: Path, config: dict[str, Any], tensors: dict[str, Tensor], metadata: dict[str, str]) -> Path:
    """``config.json`` and the weights, built complete in a temporary folder beside ``out`` and swapped in
    (``ldm.fileio.replace_dir``), so ``out`` is never half-written and a crash leaves the old or the new folder."""
    from ldm.checkpoint import save_state_dict

    with replace_dir(out) as tmp:
        write_json_atomic(tmp / CONFIG_NAME, config, sort_keys=True)
        save_state_dict(tensors, tmp / WEIGHTS_NAME, metadata=metadata)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.export_diffusers", __doc__)
    p.add_argument("ckpt", type=Path, metavar="CKPT", help="checkpoint with control_model.* (merged, trainable, init)")
    p.add_argument("out", type=Path, metavar="OUT_DIR", help="output folder (config.json + weights)")
    p.add_argument("--config", type=Path, help="experiment config (default: the checkpoint's metadata)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    add_common_flags(p)
    return p.parse_args(argv)


def _body(args: argparse.Namespace) -> int:
    from ldm.checkpoint import load_state_dict

    from cldm.diffusers_export import check_exportable, diffusers_config, to_diffusers

    out = check_output_dir(args.out, force=args.force)
    check_replaceable(out)
    if not args.ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    cfg, cfg_source = resolve_config(args.config, args.ckpt)
    unet, control = cfg.model.unet, cfg.model.control
    check_exportable(unet, control)  # before reading gigabytes
    start = time.perf_counter()
    tensors = to_diffusers(load_state_dict(args.ckpt, unsafe_pickle=args.unsafe_pickle), unet, control)
    # What the weights are made from travels with them (the checkpoint's records; an external one if it has none).
    metadata = {"format": "pt", **checkpoint_metadata(cfg, "diffusers_controlnet", checkpoint_provenance(args.ckpt),
                                                      source=args.ckpt.name)}
    write_folder(out, diffusers_config(unet, control), tensors, metadata)
    numel = sum(v.numel() for v in tensors.values())
    logger.info("wrote %s (%s + %s: %d tensors, %.1f M values; config from %s) in %.1f s; load it with "
                "diffusers.ControlNetModel.from_pretrained(%r)", out, CONFIG_NAME, WEIGHTS_NAME, len(tensors),
                numel / 1e6, cfg_source, time.perf_counter() - start, str(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(_body, args)


if __name__ == "__main__":
    raise SystemExit(main())
