"""Where the memorisation screen's calibrated thresholds come from, measured on a split (``python -m tools.split``
output): the test images stand in for generated images that are distinct from every training image, and training
images re-saved as JPEG (quality 70) or rescaled 1.5× stand in for near-copies. For each tower it prints the
calibrated thresholds (``siamese.evaluation.quality.memorisation``: ``COPY_MARGIN`` × the smallest leave-one-out
distance between distinct training images) and the share of each group flagged, beside the fixed thresholds.

    python -m tools.demo_data /tmp/mc/data --samples 200 && python -m tools.split /tmp/mc/data --out /tmp/mc/split
    python bench/memorisation_calibration.py /tmp/mc/split --tower first_stage \\
        --weights data/pretrained/base_tiny.safetensors
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import ldm  # noqa: F401  (the torchvision shim first)

import cv2
import numpy as np

from siamese.data.images import read_image_rgb
from siamese.data.split import read_split_dataset
from siamese.evaluation import quality
from siamese.evaluation.features import pixel_vectors
from siamese.evaluation.towers import load_feature_extractor


def _copies(paths: list[Path]) -> list[np.ndarray]:
    out = []
    for path in paths:
        rgb = read_image_rgb(path)
        ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 70])
        out.append(cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))
        size = (rgb.shape[1] * 3 // 2, rgb.shape[0] * 3 // 2)
        out.append(cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split", type=Path, help="a python -m tools.split output")
    p.add_argument("--tower", default="first_stage", help="feature tower (first_stage, tiny, inception, timm:…)")
    p.add_argument("--weights", type=Path, help="its local weight file")
    p.add_argument("--copies", type=int, default=60, help="training images to re-save as copies (60)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    sides = read_split_dataset(args.split)
    train = [x.image for x in sides["train"]]
    distinct = [read_image_rgb(x.image) for x in sides["test"]]
    copies = _copies(train[:args.copies])
    tower = load_feature_extractor(args.tower, args.weights)
    train_f = tower.features(train, progress=False)
    train_p = pixel_vectors(train)
    print(f"{len(train)} training images, {len(distinct)} distinct (test) images, {len(copies)} copies; tower "
          f"{args.tower}")
    for label, kwargs in (("calibrated", {}), ("fixed", {"feature_threshold": quality.DEFAULT_FEATURE_THRESHOLD,
                                                        "pixel_threshold": quality.DEFAULT_PIXEL_THRESHOLD})):
        for group, images in (("distinct", distinct), ("copies", copies)):
            report = quality.memorisation(images, train, synthetic_features=tower.features(images, progress=False),
                                          training_features=train_f, training_pixels=train_p, **kwargs)
            s = report.summary()
            print(f"{label:>10} thresholds (feature {s['feature_threshold']:.4g}, pixel {s['pixel_threshold']:.4g}): "
                  f"{group:>8} flagged {s['flagged_any']}/{s['n_synthetic']} (feature {s['flagged_feature']}, "
                  f"pixel {s['flagged_pixel']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
