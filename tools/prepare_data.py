"""Pair a folder of images with a folder of masks and write the training layout (images/, masks/, prompt.json).

    python -m tools.prepare_data --images Kvasir-SEG/images --masks Kvasir-SEG/masks --out data/kvasir
    python -m tools.prepare_data --images isic/input --masks isic/truth --out data/isic --prompt "A dermoscopy image."

Files are paired by name: the mask of ``NAME.jpg`` is ``NAME<suffix>.png`` (extensions may differ). Without
--mask-suffix the suffix is recognised among '' (same name), _segmentation, _Segmentation, _mask, _Mask, -mask, _seg,
_gt and _label: the one that pairs the most files wins, and a tie stops with a request for --mask-suffix. Only files
directly inside each folder count (png/jpg/jpeg/bmp/tif/tiff, hidden files skipped). The files are copied (--link:
symlinked) into OUT/images and OUT/masks, the mask renamed to its image's name, and OUT/prompt.json lists the pairs
with paths relative to OUT. Images or masks without a partner are skipped and reported. An existing prompt.json (or
output file) is only replaced with --force. Next: ``python -m tools.doctor OUT``, then train with data.root=OUT.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese.data.layout import DEFAULT_PROMPT
from siamese.data.prepare import prepare_dataset
from tools._cli import make_parser, run


def _body(args: argparse.Namespace) -> int:
    prepare_dataset(args.images, args.masks, args.out, mask_suffix=args.mask_suffix, prompt=args.prompt,
                    link=args.link, overwrite=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m tools.prepare_data", __doc__)
    p.add_argument("--images", type=Path, required=True, help="folder of images (the training targets)")
    p.add_argument("--masks", type=Path, required=True, help="folder of masks (may be the images folder)")
    p.add_argument("--out", type=Path, required=True, help="dataset root to write (images/, masks/, prompt.json)")
    p.add_argument("--mask-suffix", default=None, metavar="S",
                   help="mask name = image name + S, e.g. _segmentation ('' = same name; default: recognised)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the prompt of every pair (default {DEFAULT_PROMPT!r})")
    p.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    p.add_argument("--force", action="store_true", help="replace an existing prompt.json and output files")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
