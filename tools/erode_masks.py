"""``python -m tools.erode_masks``: erode the masks of an existing pairs folder into a new one (mask corrosion).

    python -m tools.erode_masks synth/siamese --out synth/siamese_eroded2 --erode 2
    python -m tools.erode_masks synth/siamese --out synth/siamese_rect3 --erode 3 --kernel rect

MedDiff-FT (Xie et al., MICCAI 2025) erodes ("corrodes") the masks of generated pairs by a few pixels so that a
label lies inside the soft boundary of the generated lesion. ``tutorial_inference.py --erode K`` does it while
sampling; this tool does it afterwards, on a folder ``tutorial_inference.py`` wrote (``manifest.jsonl``, ``images/``,
``masks/``): OUT gets the same images (hard links where the file system allows, else copies), the eroded masks and
a manifest whose lines record ``erode``, ``erode_kernel``, ``mask_eroded`` (False: erosion would have emptied the
mask, which is then kept as it is) and ``eroded_from`` (``source`` and ``background`` relative to OUT), and SRC's
``provenance.json`` (what made the pairs). The source folder is never modified; OUT is written under a
temporary name and renamed at the end. A folder whose masks are already eroded is refused (erode its source).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from siamese.data.masks import EROSION_KERNELS
from siamese.meddiff.erosion import erode_folder
from tools._cli import check_output_dir, make_parser, run

logger = logging.getLogger("siamese.erode_masks")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.erode_masks", __doc__)
    p.add_argument("src", type=Path, metavar="SRC", help="a pairs folder written by tutorial_inference.py")
    p.add_argument("--out", type=Path, required=True, help="new folder for the eroded pairs")
    p.add_argument("--erode", type=int, required=True, metavar="K", help="erosion in pixels (> 0)")
    p.add_argument("--kernel", choices=sorted(EROSION_KERNELS), default="ellipse",
                   help="shape of the (2K+1)² structuring element (default ellipse)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p.parse_args(argv)


def _body(args: argparse.Namespace) -> int:
    if args.erode <= 0:
        raise ValueError(f"--erode must be > 0 pixels, got {args.erode}")
    if args.out.resolve() == args.src.resolve():
        raise ValueError(f"--out {args.out} is the source folder; the source is never modified")
    check_output_dir(args.out, force=args.force)
    counts = erode_folder(args.src, args.out, args.erode, args.kernel)
    logger.info("wrote %s: %d pairs, %d masks eroded by %d px (%s), %d kept as they were (erosion would empty them)",
                args.out, counts["pairs"], counts["eroded"], args.erode, args.kernel, counts["kept"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
