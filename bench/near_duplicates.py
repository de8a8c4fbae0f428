"""Where the near-duplicate threshold of the leak check comes from: on a split (``python -m tools.split`` output), the
largest thumbnail correlation between distinct train and test images, and the smallest between an image and the same
image re-saved as JPEG (quality 70) or rescaled 1.5×. ``siamese.evaluation.leaks.NEAR_DUPLICATE_CORRELATION`` must
lie between the two.

    python bench/near_duplicates.py runs/demo/split
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

from siamese.data.split import read_split_dataset
from siamese.evaluation.leaks import NEAR_DUPLICATE_CORRELATION, thumbnail


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split", type=Path, help="a python -m tools.split output")
    p.add_argument("--copies", type=int, default=60, help="training images to re-save and compare (60)")
    args = p.parse_args(argv)
    sides = read_split_dataset(args.split)
    train = np.stack([thumbnail(x.image) for x in sides["train"]])
    test = np.stack([thumbnail(x.image) for x in sides["test"]])
    distinct = train @ test.T
    worst_copy = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        for pair in sides["train"][:args.copies]:
            image = cv2.imread(str(pair.image))
            jpeg, scaled = Path(tmp) / "copy.jpg", Path(tmp) / "copy.png"
            cv2.imwrite(str(jpeg), image, [cv2.IMWRITE_JPEG_QUALITY, 70])
            size = (image.shape[1] * 3 // 2, image.shape[0] * 3 // 2)
            cv2.imwrite(str(scaled), cv2.resize(image, size, interpolation=cv2.INTER_CUBIC))
            own = thumbnail(pair.image)
            worst_copy = min(worst_copy, float(own @ thumbnail(jpeg)), float(own @ thumbnail(scaled)))
    print(f"{len(sides['train'])} × {len(sides['test'])} distinct train/test images: max correlation "
          f"{distinct.max():.3f} (99.9th percentile {np.percentile(distinct, 99.9):.3f})")
    print(f"the same image re-saved (JPEG q70, rescaled 1.5×), {args.copies} images: min correlation {worst_copy:.4f}")
    print(f"threshold {NEAR_DUPLICATE_CORRELATION}: "
          f"{'separates them' if distinct.max() < NEAR_DUPLICATE_CORRELATION <= worst_copy else 'does NOT separate'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
