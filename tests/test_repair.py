"""MedDiff-FT's healthy-background repair (``python -m tools.repair_backgrounds``): the lesion region is regenerated
by a base model, every pixel away from it is the real image's, and the output is a background library the pair
sampler takes."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict

import cv2
import numpy as np
import pytest

from siamese.data.images import read_image_rgb
from siamese.data.masks import read_mask, resize_mask
from siamese.data.synthetic import write_synthetic_dataset
from siamese.meddiff.repair import dilate_region, paste_weights, repair_items
from siamese.sampling import collect_backgrounds
from tools import repair_backgrounds

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "base_tiny.safetensors"


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_region_and_paste_weights():
    lesion = np.zeros((32, 32), np.uint8)
    lesion[12:20, 12:20] = 1
    region = dilate_region(lesion, 3)
    assert region[9:23, 12:20].all() and region.sum() > lesion.sum() and not region[:6].any()
    assert np.array_equal(dilate_region(lesion, 0), lesion)
    weight = paste_weights(region, lesion, feather=1.5)
    assert (weight[lesion == 1] == 1).all()  # the lesion is always replaced
    assert (weight[:4] == 0).all() and (weight[:, :4] == 0).all()  # far away: the real pixels, exactly
    assert 0 < weight[8, 16] < 1  # a soft edge in the dilated rim
    assert np.array_equal(paste_weights(region, lesion, 0), region.astype(np.float32))
    with pytest.raises(ValueError, match="dilation must be >= 0"):
        dilate_region(lesion, -1)


def test_items_are_named_by_image_and_seeded(tmp_path):
    write_synthetic_dataset(tmp_path / "data", 3, 64)
    items = repair_items(tmp_path / "data", prompt="healthy", seed=0)
    again = repair_items(tmp_path / "data" / "prompt.json", prompt="healthy", seed=0)
    other = repair_items(tmp_path / "data", prompt="healthy", seed=1)
    assert [i.name for i in items] == [i.image.stem for i in items] and items == again
    assert len({i.seed for i in items}) == 3 and all(a.seed != b.seed for a, b in zip(items, other))
    assert len(repair_items(tmp_path / "data", prompt="x", limit=2)) == 2


def test_cli_repairs_lesions_into_a_background_library(tmp_path, caplog):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 3, 64)
    out = tmp_path / "bg"
    argv = ["--ckpt", str(SHIPPED), "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--dilate", "2", "--device", "cpu"]
    assert repair_backgrounds.main(argv) == 0, _errors(caplog)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and (out / "grid.png").is_file() and not (tmp_path / "bg.partial").exists()
    cfg_prompt = "A photo of a polyp."  # the shipped base's data.prompt is null: its sample.prompt
    for line in lines:
        assert line["dilate"] == 2 and line["feather"] == 1.0 and line["steps"] == 2 and line["prompt"] == cfg_prompt
        real = cv2.resize(read_image_rgb(line["source_image"]), (64, 64), interpolation=cv2.INTER_AREA)
        lesion = resize_mask(read_mask(line["source_mask"]), 64)
        region = read_mask(out / line["region"])
        repaired = read_image_rgb(out / line["image"])
        assert np.array_equal(region, dilate_region(lesion, 2))
        assert line["region_area"] == pytest.approx(region.mean(), abs=1e-6)
        far = paste_weights(region, lesion, 1.0) == 0
        assert far.any() and np.array_equal(repaired[far], real[far])  # untouched outside, bit for bit
        assert np.abs(repaired[lesion == 1].astype(int) - real[lesion == 1]).mean() > 1  # the lesion was replaced
    # The folder is a background library for tutorial_inference.py --background OUT.
    assert [p.name for p in collect_backgrounds(out)] == sorted(f"{line['name']}.png" for line in lines)
    # Same seed: the same repair; OUT exists: refused without --force.
    assert repair_backgrounds.main(argv) == 1
    assert "exists; pass --force" in _errors(caplog)[-1]
    assert repair_backgrounds.main([*argv[:5], str(tmp_path / "bg2"), *argv[6:]]) == 0
    first = read_image_rgb(out / "images" / f"{lines[0]['name']}.png")
    assert np.array_equal(first, read_image_rgb(tmp_path / "bg2" / "images" / f"{lines[0]['name']}.png"))


def test_cli_refusals(tmp_path, caplog):
    data = tmp_path / "data"
    write_synthetic_dataset(data, 2, 64)
    base = ["--data", str(data), "--steps", "1", "--device", "cpu"]
    # A checkpoint that is not a base model (e.g. a merged ControlNet one) cannot repair.
    meta = dict(read_metadata(SHIPPED), **{"siamese.kind": "merged"})
    other = tmp_path / "merged.safetensors"
    save_state_dict(load_state_dict(SHIPPED), other, metadata=meta)
    assert repair_backgrounds.main(["--ckpt", str(other), "--out", str(tmp_path / "a"), *base]) == 1
    assert "is not a base model" in _errors(caplog)[-1]
    # The output may not be the dataset itself.
    assert repair_backgrounds.main(["--ckpt", str(SHIPPED), "--out", str(data), *base]) == 1
    assert "never modified" in _errors(caplog)[-1]
    # An image whose mask has another aspect ratio: one line naming both, nothing left behind.
    mask = sorted((data / "masks").iterdir())[0]
    cv2.imwrite(str(mask), np.zeros((64, 32), np.uint8))
    assert repair_backgrounds.main(["--ckpt", str(SHIPPED), "--out", str(tmp_path / "b"), *base]) == 1
    assert "different aspect ratios" in _errors(caplog)[-1] and mask.name in _errors(caplog)[-1]
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()
    assert repair_backgrounds.main(["--ckpt", str(SHIPPED), "--out", str(tmp_path / "c"), "--dilate", "-1",
                                    *base]) == 1
