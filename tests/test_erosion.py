"""Mask erosion (MedDiff-FT's "corrosion"): the library function, ``tutorial_inference.py --erode K`` while
sampling, and ``python -m tools.erode_masks`` on an existing pairs folder (the source is never modified)."""

from __future__ import annotations

import json
import logging

import cv2
import numpy as np
import pytest
from test_inference import base_out, cli, env, files, manifest_lines, run_cli  # noqa: F401  (fixtures)

from siamese.data.masks import erode_mask, mask_erodes
from tools import erode_masks


def test_erode_mask_by_k_pixels_with_each_kernel():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1  # a 16×16 square
    assert erode_mask(mask, 2, "rect").sum() == 12 * 12
    ellipse = erode_mask(mask, 2, "ellipse")
    assert ellipse.sum() == 12 * 12 and set(np.unique(ellipse)) <= {0, 1}  # a square erodes to a square either way
    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (32, 32), 20, 1, -1)
    assert erode_mask(disc, 3, "ellipse").sum() < disc.sum() - 300
    assert np.array_equal(erode_mask(mask, 0), mask)
    # Erosion that would empty the mask keeps it (an empty label on a lesion image is worse than a loose one).
    thin = np.zeros((32, 32), np.uint8)
    thin[10:13, 5:25] = 1
    assert np.array_equal(erode_mask(thin, 2), thin) and not mask_erodes(thin, 2)
    assert mask_erodes(mask, 2)
    with pytest.raises(ValueError, match="must contain only 0 and 1"):
        erode_mask(mask * 255, 1)
    with pytest.raises(ValueError, match="erosion kernel 'disk' is not one of"):
        erode_mask(mask, 1, "disk")


def test_sampler_erodes_saved_masks_and_records_it(env, base_out, tmp_path):  # noqa: F811
    out = tmp_path / "eroded"
    assert run_cli(cli(env, out, "--batch-size", "3", "--erode", "1", "--erode-kernel", "rect"))["generated"] == 6
    records = {r["name"]: r for r in manifest_lines(out)}
    assert {(r["erode"], r["erode_kernel"]) for r in records.values()} == {(1, "rect")}
    base = files(base_out)
    for name, record in records.items():
        # The image is the one sampled with the full mask; only the saved mask is eroded.
        assert files(out)[f"images/{name}.png"] == base[f"images/{name}.png"]
        saved = cv2.imread(str(out / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE) // 255
        full = cv2.imread(str(base_out / "masks" / f"{name}.png"), cv2.IMREAD_GRAYSCALE) // 255
        assert np.array_equal(saved, erode_mask(full, 1, "rect"))
        assert record["mask_eroded"] == (not np.array_equal(saved, full))
    # Resuming with another erosion is refused like any other setting.
    assert run_cli(cli(env, out, "--batch-size", "3", "--erode", "1", "--erode-kernel", "rect"))["generated"] == 0
    with pytest.raises(ValueError, match="erode=1"):
        run_cli(cli(env, out, "--batch-size", "3", "--erode", "2"))


def test_erode_masks_tool_on_an_existing_folder(base_out, tmp_path, caplog):  # noqa: F811
    before = files(base_out)
    out = tmp_path / "eroded"
    caplog.set_level(logging.INFO)
    assert erode_masks.main([str(base_out), "--out", str(out), "--erode", "1"]) == 0
    assert files(base_out) == before  # the source is untouched
    lines = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == len(manifest_lines(base_out))
    for record in lines:
        assert record["erode"] == 1 and record["eroded_from"] == str(base_out)
        full = cv2.imread(str(base_out / record["mask"]), cv2.IMREAD_GRAYSCALE) // 255
        saved = cv2.imread(str(out / record["mask"]), cv2.IMREAD_GRAYSCALE) // 255
        assert np.array_equal(saved, erode_mask(full, 1)) and set(np.unique(saved * 255)) <= {0, 255}
        assert (out / record["image"]).read_bytes() == (base_out / record["image"]).read_bytes()
    assert "masks eroded by 1 px" in caplog.text
    # Refusals, one line each: existing output, eroding an eroded folder, the source as output, K <= 0.
    caplog.clear()
    assert erode_masks.main([str(base_out), "--out", str(out), "--erode", "1"]) == 1
    assert erode_masks.main([str(out), "--out", str(tmp_path / "twice"), "--erode", "1"]) == 1
    assert erode_masks.main([str(base_out), "--out", str(base_out), "--erode", "1"]) == 1
    assert erode_masks.main([str(base_out), "--out", str(tmp_path / "zero"), "--erode", "0"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 4 and all("\n" not in e for e in errors)
    assert "exists" in errors[0] and "already eroded" in errors[1] and "source folder" in errors[2]
    assert not (tmp_path / "twice").exists() and not (tmp_path / "twice.partial").exists()
