"""Pair a folder of images with a folder of masks and write the training layout (images/, masks/, prompt.json).

    python -m tools.prepare_data --images Kvasir-SEG/images --masks Kvasir-SEG/masks --out data/kvasir
    python -m tools.prepare_data --images isic/input --masks isic/truth --out data/isic --prompt "A dermoscopy image."
    python -m tools.prepare_data --images ct/imagesTr --masks ct/labelsTr --out data/ct --prompt "A CT slice." \
        --axis 2 --labels 1 --window=-160,240

NIfTI volumes (.nii/.nii.gz in --images, read with nibabel) become 2D pairs: every slice along --axis (after
reorientation to RAS: 0 sagittal, 1 coronal, 2 axial) whose label holds one of --labels (default: any non-zero),
or every slice with --slices all, each --step-th; the image windowed per volume (--window percentile:0.5,99.5
default, minmax, or LO,HI in the volume's units) to 8-bit PNG, the mask 0/255, named CASE_zNNN
(``siamese.data.nifti``). Image and label volumes pair by case name (label suffix recognised among '', _seg,
_label, _mask, _gt, or --mask-suffix); shapes and affines must agree.

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
    from siamese.data.nifti import NiftiSettings, is_nifti, parse_labels, prepare_nifti_dataset

    volumes = args.images.is_dir() and any(is_nifti(p) for p in args.images.iterdir())
    nifti_flags = [flag for flag, value in (("--axis", args.axis), ("--slices", args.slices), ("--step", args.step),
                                            ("--labels", args.labels), ("--window", args.window)) if value is not None]
    if volumes:
        if args.link:
            raise ValueError("--link: NIfTI volumes are sliced into new PNG files, nothing to link")
        settings = NiftiSettings(axis=2 if args.axis is None else args.axis, slices=args.slices or "lesion",
                                 step=args.step or 1, labels=parse_labels(args.labels),
                                 window=args.window or "percentile:0.5,99.5")
        prepare_nifti_dataset(args.images, args.masks, args.out, settings, prompt=args.prompt,
                              mask_suffix=args.mask_suffix, overwrite=args.force)
        return 0
    if nifti_flags:
        raise ValueError(f"{', '.join(nifti_flags)}: only for NIfTI volumes, and {args.images} holds none")
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
    v = p.add_argument_group("NIfTI volumes (when --images holds .nii/.nii.gz files)")
    v.add_argument("--axis", type=int, choices=(0, 1, 2), help="slice axis after reorientation to RAS: 0 sagittal, "
                                                              "1 coronal, 2 axial (default 2)")
    v.add_argument("--slices", choices=("lesion", "all"), help="slices whose label has foreground (default) or all")
    v.add_argument("--step", type=int, help="keep every N-th of those slices (default 1)")
    v.add_argument("--labels", metavar="L1,L2", help="label values that are foreground (default: any non-zero)")
    v.add_argument("--window", metavar="SPEC", help="intensity window per volume: percentile[:LOW,HIGH] (default "
                                                    "0.5,99.5), minmax, or LO,HI (e.g. --window=-160,240 HU)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
