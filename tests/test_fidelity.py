"""Mask fidelity: the Dice measure and the colour rule that segments the framework's generated lesion domain."""

from __future__ import annotations

import json

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import numpy as np
import pytest

from siamese.data.masks import mask_to_png
from siamese.data.synthetic import synthetic_pair
from siamese.evaluation.fidelity import dice, score_pairs, segment_generated_lesion


def test_dice_conventions():
    a = np.zeros((4, 4), np.uint8)
    b = a.copy()
    assert dice(a, b) == 1.0  # two empty masks agree
    a[:2] = 1
    assert dice(a, a) == 1.0
    b[2:] = 1
    assert dice(a, b) == 0.0
    c = np.zeros((4, 4), np.uint8)
    c[:1] = 1
    assert dice(a, c) == pytest.approx(2 * 4 / (8 + 4))
    with pytest.raises(ValueError, match="different shapes"):
        dice(a, np.zeros((3, 4), np.uint8))


def test_colour_rule_segments_real_generated_images_and_not_noise():
    scores = [dice(segment_generated_lesion(rgb), mask) for rgb, mask in
              (synthetic_pair(i, 64, seed=321) for i in range(60))]
    assert np.mean(scores) >= 0.9
    rng = np.random.default_rng(0)
    noise = [dice(segment_generated_lesion(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)),
                  synthetic_pair(i, 64, seed=321)[1]) for i in range(30)]
    assert np.mean(noise) < 0.3


def test_score_pairs_reads_a_sampling_output_folder(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    lines = []
    for i in range(3):
        rgb, mask = synthetic_pair(i, 64, seed=9)
        # Pair 2's image belongs to another mask: its fidelity must be low.
        image = rgb if i < 2 else synthetic_pair(50, 64, seed=9)[0]
        cv2.imwrite(str(tmp_path / "images" / f"p{i}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / "masks" / f"p{i}.png"), mask_to_png(mask))
        lines.append(json.dumps({"name": f"p{i}", "image": f"images/p{i}.png", "mask": f"masks/p{i}.png"}))
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    scores = score_pairs(tmp_path)
    assert [s.name for s in scores] == ["p0", "p1", "p2"]
    assert scores[0].dice > 0.8 and scores[1].dice > 0.8 and scores[2].dice < 0.5
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        score_pairs(tmp_path / "images")
