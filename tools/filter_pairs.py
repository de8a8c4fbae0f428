"""``python -m tools.filter_pairs``: keep the generated pairs that are neither near-copies nor off-domain.

    python -m tools.filter_pairs synth/siamese --real data/polyps --out synth/siamese_filtered \\
        --features timm:vit_small_patch14_dinov2.lvd142m --weights models/dinov2_vits14.safetensors
    python -m tools.filter_pairs synth/siamese --real data/polyps --out synth/f --low 0.55 --high 0.97 ...

MedDiff-FT's quality filter (Xie et al., MICCAI 2025): each generated image's cosine similarity to its nearest real
image in a frozen feature space (``siamese/meddiff/filtering.py``; the band defaults to what the distinct real images'
leave-one-out similarities imply, ``--low`` / ``--high`` set it). A pair made on a background (``--background``
sampling) is compared with the other real images, and with its own background inside its generated region only
(against ``--references`` other real images cropped the same way). SRC is a folder tutorial_inference.py wrote; REAL a
prompt.json dataset or a folder of images. OUT becomes a pairs folder of the kept pairs (images and masks hard-linked
where possible, else copied; ``manifest.jsonl`` with each kept line plus its ``filter_similarity``, ``source`` and
``background`` relative to OUT; SRC's ``provenance.json``), usable as is by ``tools.evaluate --synthetic OUT``, and
``OUT/filter_report.json`` with the band and every pair's similarity, nearest real image and verdict. Nothing is
deleted; SRC is never modified. The feature tower comes from a local weight file (nothing downloads): ``timm:<name>``
(e.g. DINOv2), ``torchvision:<arch>``, ``open_clip:<model>``, ``inception``, or ``tiny`` (a seeded random network:
tests only).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from siamese.data.images import read_image_rgb
from siamese.data.masks import read_mask, resize_mask
from siamese.data.pairs import complete_records, conditioning_mask_path
from siamese.data.provenance import digest_file
from tools._cli import check_output_dir, make_parser, run

if TYPE_CHECKING:
    from siamese.meddiff.filtering import OwnBackground

# torch-backed modules are imported in the functions that use them: --help stays fast

logger = logging.getLogger("siamese.filter_pairs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.filter_pairs", __doc__)
    p.add_argument("src", type=Path, metavar="SRC", help="a pairs folder written by tutorial_inference.py")
    p.add_argument("--real", type=Path, required=True, help="the real images: prompt.json dataset or image folder")
    p.add_argument("--out", type=Path, required=True, help="new folder for the kept pairs and the report")
    p.add_argument("--features", default="timm:vit_small_patch14_dinov2.lvd142m",
                   help="feature tower (default: DINOv2 ViT-S/14 through timm; needs --weights); also "
                        "torchvision:ARCH, open_clip:MODEL, or first_stage with --weights = a base or merged "
                        "checkpoint of this framework (its VAE encoder: the domain's own features)")
    p.add_argument("--weights", type=Path, help="local weight file of the feature tower")
    p.add_argument("--image-size", type=int, help="input size of the tower (default: its own)")
    p.add_argument("--low", type=float, help="keep similarities >= LOW (default: the --low-quantile of the real "
                                             "images' leave-one-out nearest-neighbour similarity)")
    p.add_argument("--high", type=float, help="keep similarities <= HIGH (default: the largest real leave-one-out "
                                              "similarity: closer than that is a near-copy)")
    p.add_argument("--low-quantile", type=float, default=0.01, help="quantile for the default LOW (default 0.01)")
    p.add_argument("--references", type=int, default=8,
                   help="pairs made on a background: how many other real images its region is also compared with "
                        "(default 8; seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reference draw (default 0)")
    p.add_argument("--device", default="cpu", help="torch device of the feature tower (default cpu)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p.parse_args(argv)


def _generated_region(record: dict, src: Path, shape: tuple[int, int]) -> np.ndarray:
    """The image pixels a background-preserving pair generated (``ldm.regions.image_region`` of its conditioning
    mask), at the saved image's size; for ``--keep-size`` pairs computed on the grid they were sampled at."""
    from ldm.regions import image_region

    mask = read_mask(conditioning_mask_path(record, src))
    spec, factor = record.get("region", "max-pool"), int(record.get("latent_factor", 8))
    sampled = tuple(record.get("sampled_size") or shape)
    if tuple(mask.shape) != sampled:
        mask = resize_mask(mask, sampled)
    region = image_region(mask, factor, spec)
    return region if tuple(region.shape) == tuple(shape) else resize_mask(region, shape)


def _own_backgrounds(args: argparse.Namespace, src: Path, records: dict, names: list[str], real_images: list[Path],
                     extractor) -> list[OwnBackground | None]:
    """For each pair made on a background: its region comparison with that background (None for the others)."""
    from siamese.meddiff.filtering import OwnBackground, own_background

    with_bg = [n for n in names if records[n].get("background")]
    if not with_bg:
        return [None] * len(names)
    if args.references < 1:
        raise ValueError(f"--references must be at least 1, got {args.references}")
    by_digest = {digest_file(p): i for i, p in enumerate(real_images)}
    rng = np.random.default_rng(args.seed)

    def features(images: list[np.ndarray]) -> np.ndarray:
        return extractor.features(images, args.batch_size, progress=False)

    logger.info("%d pairs were made on a background: comparing each with it inside its generated region", len(with_bg))
    own: dict[str, OwnBackground] = {}
    for name in with_bg:
        record = records[name]
        background = src / record["background"]
        if not background.is_file():
            raise FileNotFoundError(f"{src / 'manifest.jsonl'}: pair {name}: background {background} not found")
        index = by_digest.get(record.get("background_digest") or digest_file(background))
        image = read_image_rgb(src / record["image"])
        region = _generated_region(record, src, image.shape[:2])
        if not region.any():  # nothing generated: the image is its background
            own[name] = OwnBackground(1.0, 0.0, index)
            continue
        others = [i for i in range(len(real_images)) if i != index]
        picks = rng.choice(len(others), min(args.references, len(others)), replace=False)
        references = [read_image_rgb(real_images[others[int(k)]]) for k in picks]
        own[name] = own_background(features, image, read_image_rgb(background), region, references, index)
    return [own.get(n) for n in names]


def _body(args: argparse.Namespace) -> int:
    from siamese.evaluation.features import read_dataset_images
    from siamese.evaluation.towers import load_feature_extractor
    from siamese.meddiff.filtering import default_band, judge, write_kept

    src, out = args.src, args.out
    if out.resolve() == src.resolve():
        raise ValueError(f"--out {out} is the source folder; the source is never modified")
    check_output_dir(out, force=args.force)
    records = complete_records(src)
    real_images = read_dataset_images(args.real)
    extractor = load_feature_extractor(args.features, args.weights, device=args.device, image_size=args.image_size)
    progress = not args.no_progress
    real = extractor.features(real_images, args.batch_size, progress=progress)
    names = list(records)
    synthetic = extractor.features([src / records[n]["image"] for n in names], args.batch_size, progress=progress)
    band = default_band(real, args.low, args.high, args.low_quantile, images=real_images)
    own = _own_backgrounds(args, src, records, names, real_images, extractor)
    verdicts = judge(synthetic, real, band, own)
    kept = [n for n, v in zip(names, verdicts, strict=True) if v.verdict == "kept"]
    counts = {k: sum(v.verdict == k for v in verdicts) for k in ("kept", "near-copy", "off-domain")}
    if not kept:
        raise ValueError(f"the filter keeps no pair of {len(names)} (band [{band.low:.4f}, {band.high:.4f}]: "
                         f"{counts['near-copy']} near-copies, {counts['off-domain']} off-domain); nothing written")
    report = {"source": str(src), "real": str(args.real), "features": args.features,
              "weights": str(args.weights) if args.weights else None,
              "band": {"low": band.low, "high": band.high, "low_from": band.low_source, "high_from": band.high_source,
                       "real_duplicates_left_out": [list(d) for d in band.duplicates]},
              "counts": counts,
              "pairs": [{"name": n, "similarity": v.similarity, "nearest_real": str(real_images[v.nearest_real]),
                         "verdict": v.verdict,
                         **({} if v.background_similarity is None else {
                             "background_similarity": v.background_similarity,
                             "background_bound": v.background_bound})}
                        for n, v in zip(names, verdicts, strict=True)]}
    write_kept(src, out, records, dict(zip(names, verdicts, strict=True)), report)
    logger.info("kept %d of %d pairs (band [%.4f, %.4f]; %d near-copies, %d off-domain): %s", counts["kept"],
                len(names), band.low, band.high, counts["near-copy"], counts["off-domain"], out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
