"""NIfTI volumes as 2D pairs (``python -m tools.prepare_data`` on .nii/.nii.gz): slices along an anatomical axis
whatever the storage orientation, lesion slices by default, labels selected, a per-volume intensity window, and
one-line refusals for volumes that do not fit."""

from __future__ import annotations

import json
import logging

import cv2
import nibabel as nib
import numpy as np
import pytest

from siamese.data.layout import read_prompt_jsonl
from siamese.data.masks import read_mask
from tools import prepare_data


def _case(folder, name, *, flip=False, label_suffix="_seg"):
    """A 24×20×10 CT-like volume (HU −1000..1000) with a label 1 sphere on slices 3..6 and a label 2 blob on 8."""
    rng = np.random.default_rng(len(name))
    volume = rng.uniform(-1000, 1000, (24, 20, 10)).astype(np.float32)
    label = np.zeros((24, 20, 10), np.int16)
    zz, yy, xx = np.meshgrid(np.arange(10), np.arange(20), np.arange(24), indexing="ij")
    label[((xx - 12) ** 2 + (yy - 10) ** 2 + (zz - 4.5) ** 2).transpose(2, 1, 0) < 9] = 1
    label[5:8, 5:8, 8] = 2
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    if flip:  # the same anatomy stored with x reversed (a LAS file): the slices must come out the same
        volume, label = volume[::-1].copy(), label[::-1].copy()
        affine = affine @ np.array([[-1, 0, 0, 23], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume, affine), str(folder / f"{name}.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / f"{name}{label_suffix}.nii.gz"))
    return volume, label


def test_volumes_become_lesion_slices_in_the_training_layout(tmp_path):
    volume, label = _case(tmp_path / "vol", "case1")
    _case(tmp_path / "vol", "case2", flip=True)
    out = tmp_path / "out"
    assert prepare_data.main(["--images", str(tmp_path / "vol"), "--masks", str(tmp_path / "vol"), "--out", str(out),
                              "--prompt", "A CT slice."]) == 0
    records = read_prompt_jsonl(out / "prompt.json")
    names = sorted(r.source.stem for r in records)
    lesion_slices = [z for z in range(10) if label[:, :, z].any()]
    assert names == sorted(f"case{c}_z{z:03d}" for c in (1, 2) for z in lesion_slices)
    assert {r.prompt for r in records} == {"A CT slice."}
    # The slice is the volume's axial plane, rotated so anterior is up; the mask lies on it.
    z = lesion_slices[0]
    mask = read_mask(out / "masks" / f"case1_z{z:03d}.png")
    np.testing.assert_array_equal(mask, np.rot90(label[:, :, z] != 0).astype(np.uint8))
    # A file stored in another orientation gives the same slice geometry (reoriented to RAS first).
    np.testing.assert_array_equal(read_mask(out / "masks" / f"case2_z{z:03d}.png"), mask)
    image = cv2.imread(str(out / "images" / f"case1_z{z:03d}.png"), cv2.IMREAD_UNCHANGED)
    low, high = np.percentile(volume, (0.5, 99.5))
    expected = np.clip(np.rint((volume[:, :, z].astype(np.float64) - low) * 255 / (high - low)), 0, 255)
    np.testing.assert_array_equal(image, np.rot90(expected).astype(np.uint8))
    line = json.loads((out / "prompt.json").read_text().splitlines()[0])
    assert {line["volume"], line["axis"]} == {"case1.nii.gz", 2}


def test_labels_slices_step_and_a_fixed_window(tmp_path):
    # Images and labels in two folders under the same names.
    (tmp_path / "two_img").mkdir()
    (tmp_path / "two_lab").mkdir()
    volume_b, _ = _case(tmp_path / "tmp", "b", label_suffix="_x")
    (tmp_path / "tmp" / "b_x.nii.gz").rename(tmp_path / "two_lab" / "b.nii.gz")
    (tmp_path / "tmp" / "b.nii.gz").rename(tmp_path / "two_img" / "b.nii.gz")
    out = tmp_path / "only2"
    assert prepare_data.main(["--images", str(tmp_path / "two_img"), "--masks", str(tmp_path / "two_lab"), "--out",
                              str(out), "--labels", "2", "--window=-500,500"]) == 0
    (record,) = read_prompt_jsonl(out / "prompt.json")
    assert record.source.stem == "b_z008"
    image = cv2.imread(str(record.target), cv2.IMREAD_UNCHANGED)
    expected = np.clip(np.rint((volume_b[:, :, 8].astype(np.float64) + 500) * 255 / 1000), 0, 255)
    np.testing.assert_array_equal(image, np.rot90(expected).astype(np.uint8))
    every = tmp_path / "all"
    assert prepare_data.main(["--images", str(tmp_path / "two_img"), "--masks", str(tmp_path / "two_lab"), "--out",
                              str(every), "--slices", "all", "--step", "3", "--axis", "0"]) == 0
    assert sorted(r.source.stem for r in read_prompt_jsonl(every / "prompt.json")) == [
        f"b_x{i:03d}" for i in range(0, 24, 3)]


def test_volumes_that_do_not_fit_are_refused_in_one_line(tmp_path, caplog):
    _case(tmp_path / "v", "c")
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 9), np.int16), np.diag([0.8, 0.8, 2.5, 1.0])),
             str(tmp_path / "v" / "c_seg.nii.gz"))
    base = ["--images", str(tmp_path / "v"), "--masks", str(tmp_path / "v")]
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main([*base, "--out", str(tmp_path / "o1")]) == 1
        assert prepare_data.main([*base, "--out", str(tmp_path / "o2"), "--window", "percentile:90,10"]) == 1
        assert prepare_data.main([*base, "--out", str(tmp_path / "o3"), "--labels", "one"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "does not match image volume" in errors[0] and "LOW < HIGH" in errors[1] and "integers" in errors[2]
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))
    (tmp_path / "png").mkdir()
    cv2.imwrite(str(tmp_path / "png" / "x.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(SystemExit):
        prepare_data.main(["--images", str(tmp_path / "png"), "--masks", str(tmp_path / "png"), "--out",
                           str(tmp_path / "o4"), "--axis", "5"])
