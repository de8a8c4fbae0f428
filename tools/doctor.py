"""Check a training dataset before a long run: every prompt.json line, every file, every mask, in one pass.

    python -m tools.doctor data/isic
    python -m tools.doctor --config configs/siamese_sd15.yaml          # ROOT = the config's data.root

ROOT is a folder with prompt.json, or the JSONL file itself. Every image and mask is read the way training reads
it (one file at a time), and the findings are printed as a table, one row per kind with a count and a few example
files: errors (training fails or the data are useless: bad JSONL lines with their line numbers, missing or
undecodable files, image/mask aspect ratios that differ, every mask empty, label masks emptied by an explicit
threshold), warnings (probably unintended: 0/1 label masks, multi-class or non-binary masks with their value
histogram, empty or full masks, duplicates, images smaller than the training resolution) and infos (how the data
will be read: gray and 16-bit images, alpha, size differences, non-square images). The exit code is 1 when there
is an error, 0 otherwise (warnings do not fail). Sizes and masks are judged with data.resolution and
data.mask_threshold from --config, or --resolution / --mask-threshold (defaults: 384, auto).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from siamese.config import ConfigError, load_config
from siamese.data.check import DEFAULT_RESOLUTION, check_dataset, format_findings
from siamese.data.images import parse_intensity
from tools._cli import EXIT_FAILURE, make_parser, run

logger = logging.getLogger("siamese.tools.doctor")


def _threshold(text: str) -> int | None:
    if text.lower() in ("auto", "null", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer 0..254, got {text!r}") from None
    if not 0 <= value <= 254:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer 0..254, got {value}")
    return value


def _body(args: argparse.Namespace) -> int:
    root, resolution, threshold, intensity = args.root, DEFAULT_RESOLUTION, None, "auto"
    if args.config is not None:
        cfg = load_config(args.config)
        resolution, threshold, intensity = cfg.data.resolution, cfg.data.mask_threshold, cfg.data.intensity
        if root is None:
            if cfg.data.root is None:
                raise ConfigError(f"{args.config}: data.root is null (generated data): give ROOT to check")
            root = Path(cfg.data.root)
    if root is None:
        raise ConfigError("give ROOT (a folder with prompt.json, or the file) or a --config with data.root")
    if args.resolution is not None:
        resolution = args.resolution
    if hasattr(args, "mask_threshold"):  # given (argparse.SUPPRESS leaves it out otherwise); None = auto
        threshold = args.mask_threshold
    if args.intensity is not None:
        intensity = args.intensity
    if resolution <= 0:
        raise ConfigError(f"--resolution must be > 0, got {resolution}")
    try:
        intensity = parse_intensity(intensity)
    except ValueError as error:
        raise ConfigError(f"--intensity: {error}") from None
    findings = check_dataset(root, resolution=resolution, threshold=threshold, intensity=intensity)
    sys.stdout.write(format_findings(findings))
    kinds = {severity: [f for f in findings if f.severity == severity] for severity in ("error", "warning")}
    checked = next((f.count for f in findings if f.code == "checked"), 0)
    rule = "auto" if threshold is None else threshold
    summary = (f"{root}: {checked} pairs checked (data.resolution={resolution}, data.mask_threshold={rule}, "
               f"data.intensity={intensity}): "
               + ", ".join(f"{len(kinds[s])} {s} kind(s) ({sum(f.count for f in kinds[s])} cases)" for s in kinds))
    if kinds["error"]:
        logger.error("%s: fix the errors before training", summary)
        return EXIT_FAILURE
    logger.info("%s: ready to train", summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m tools.doctor", __doc__)
    p.add_argument("root", type=Path, nargs="?", help="dataset folder with prompt.json, or the JSONL file "
                                                     "(default: the config's data.root)")
    p.add_argument("--config", type=Path, help="experiment YAML: its data.resolution, data.mask_threshold, data.root")
    p.add_argument("--resolution", type=int, help=f"training resolution (default: the config's, else "
                                                  f"{DEFAULT_RESOLUTION})")
    p.add_argument("--mask-threshold", metavar="T", type=_threshold, default=argparse.SUPPRESS,
                   help="mask threshold 0..254 or 'auto' (default: the config's data.mask_threshold, else auto)")
    p.add_argument("--intensity", metavar="MODE",
                   help="how 16-bit/float images become 8 bit: auto, full_range, minmax, percentile[:LOW,HIGH] "
                        "(default: the config's data.intensity, else auto)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
