"""Tests of the data layer: prompt.json parsing, mask handling, the datasets and the synthetic data writer."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from siamese.data.datasets import MaskImageDataset, SyntheticLesionDataset
from siamese.data.layout import PairRecord, read_prompt_jsonl
from siamese.data.masks import MaskAugment, augment_mask, binarize_mask, mask_to_png, read_mask, resize_mask
from siamese.data.synthetic import synthetic_pair, write_synthetic_dataset


def _disk(size: int = 32, radius: int = 8, centre: tuple[int, int] = (12, 14)) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    return mask


def _write_pair(root: Path, stem: str, size: tuple[int, int] = (40, 60), seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
    mask = np.zeros(size, np.uint8)
    mask[5:25, 10:40] = 255
    mask[30, 50] = 100  # below the threshold: must end up background
    cv2.imwrite(str(root / "images" / f"{stem}.jpg"), image)
    cv2.imwrite(str(root / "masks" / f"{stem}.png"), mask)
    return root / "masks" / f"{stem}.png", root / "images" / f"{stem}.jpg"


# ---------------------------------------------------------------------------------------------------- JSONL


def test_read_prompt_jsonl_relative_absolute_and_blank_lines(tmp_path: Path) -> None:
    source_a, target_a = _write_pair(tmp_path, "a")
    source_b, target_b = _write_pair(tmp_path, "b")
    lines = [
        json.dumps({"source": "masks/a.png", "target": "images/a.jpg", "prompt": "A photo of a polyp."}),
        "",
        json.dumps({"source": str(source_b.resolve()), "target": str(target_b.resolve()), "prompt": "lesion"}),
    ]
    (tmp_path / "prompt.json").write_text("\n".join(lines) + "\n")
    records = read_prompt_jsonl(tmp_path / "prompt.json")
    assert [r.prompt for r in records] == ["A photo of a polyp.", "lesion"]
    assert records[0].source.resolve() == source_a.resolve() and records[0].target.resolve() == target_a.resolve()
    assert records[1] == PairRecord(source_b.resolve(), target_b.resolve(), "lesion")


def test_read_prompt_jsonl_cwd_fallback_for_original_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The released code stored paths relative to the working directory ("data/masks/x.png" next to data/prompt.json).
    _write_pair(tmp_path / "data", "a")
    line = {"source": "data/masks/a.png", "target": "data/images/a.jpg", "prompt": "p"}
    (tmp_path / "data" / "prompt.json").write_text(json.dumps(line) + "\n")
    monkeypatch.chdir(tmp_path)
    (record,) = read_prompt_jsonl(tmp_path / "data" / "prompt.json")
    assert record.source.resolve() == (tmp_path / "data/masks/a.png").resolve()


@pytest.mark.parametrize(
    ("second_line", "expected"),
    [
        ("{not json", r"prompt\.json:2: invalid JSON"),
        ('{"source": "masks/a.png", "prompt": "p"}', r"prompt\.json:2: missing key\(s\) target"),
        ('{"source": "masks/zz.png", "target": "images/a.jpg", "prompt": "p"}', r"prompt\.json:2: 'source' file not"),
        ('{"source": "masks/a.png", "target": "images/a.jpg", "prompt": 3}', r"prompt\.json:2: key 'prompt' must be"),
        ('["masks/a.png"]', r"prompt\.json:2: expected a JSON object"),
    ],
)
def test_read_prompt_jsonl_errors_name_file_and_line(tmp_path: Path, second_line: str, expected: str) -> None:
    _write_pair(tmp_path, "a")
    good = json.dumps({"source": "masks/a.png", "target": "images/a.jpg", "prompt": "p"})
    (tmp_path / "prompt.json").write_text(good + "\n" + second_line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=expected) as info:
        read_prompt_jsonl(tmp_path / "prompt.json")
    assert "\n" not in str(info.value)


def test_read_prompt_jsonl_empty_missing_and_optional_target(tmp_path: Path) -> None:
    (tmp_path / "prompt.json").write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        read_prompt_jsonl(tmp_path / "prompt.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_prompt_jsonl(tmp_path / "nope.json")
    _write_pair(tmp_path, "a")
    (tmp_path / "prompt.json").write_text(json.dumps({"source": "masks/a.png", "prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match="missing key"):
        read_prompt_jsonl(tmp_path / "prompt.json")
    (record,) = read_prompt_jsonl(tmp_path / "prompt.json", require_target=False)
    assert record.target is None and record.source.name == "a.png"


# ---------------------------------------------------------------------------------------------------- masks


def test_binarize_gray_bgr_16bit_and_bad_shapes() -> None:
    gray = np.array([[0, 127, 128, 255]], np.uint8)
    assert binarize_mask(gray).tolist() == [[0, 0, 1, 1]]
    assert binarize_mask(gray, threshold=0).tolist() == [[0, 1, 1, 1]]
    bgr = np.repeat(gray[..., None], 3, axis=2)
    out = binarize_mask(bgr)
    assert out.dtype == np.uint8 and out.shape == (1, 4) and out.tolist() == [[0, 0, 1, 1]]
    assert binarize_mask(gray[..., None]).tolist() == [[0, 0, 1, 1]]
    assert binarize_mask(np.dstack([bgr, np.full((1, 4), 255, np.uint8)])).tolist() == [[0, 0, 1, 1]]
    # Luma convention of the original (PIL convert('L')): pure blue (BGR 255,0,0) has luma 29 -> background.
    assert binarize_mask(np.array([[[255, 0, 0], [255, 255, 255]]], np.uint8)).tolist() == [[0, 1]]
    wide = np.array([[0, 127 * 257, 128 * 257, 65535]], np.uint16)
    assert binarize_mask(wide).tolist() == [[0, 0, 1, 1]]
    assert binarize_mask(np.repeat(wide[..., None], 3, axis=2)).tolist() == [[0, 0, 1, 1]]
    with pytest.raises(ValueError, match="shape"):
        binarize_mask(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        binarize_mask(np.zeros((4,), np.uint8))
    with pytest.raises(ValueError, match="dtype"):
        binarize_mask(np.zeros((2, 2), np.float32))


def test_binarize_warns_on_label_masks(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="siamese.data.masks"):
        assert not binarize_mask(np.array([[0, 1]], np.uint8)).any()
    assert "threshold=0" in caplog.text


@pytest.mark.parametrize(("dtype", "value", "suffix"), [
    (np.uint16, 1, ".png"), (np.uint16, 3, ".png"), (np.uint16, 255, ".png"), (np.uint16, 1, ".tif"),
    (np.uint16, 65535, ".tif"), (np.uint16, 1000, ".png"), (np.uint8, 2, ".png"), (np.uint8, 100, ".png"),
    (np.uint8, 1, ".png"), (np.uint8, 255, ".png")])
def test_label_masks_of_any_bit_depth_are_not_read_as_empty(tmp_path: Path, dtype, value, suffix) -> None:
    """16-bit 0/1, 0/k, 0/255 (what NIfTI exports and annotation tools write) and 8-bit 0/k (k < 128) masks all read
    as the lesion they hold; they came out empty (÷ 257 before the label detection, or gray > 127)."""
    path = tmp_path / f"m{suffix}"
    cv2.imwrite(str(path), _disk().astype(dtype) * dtype(value))
    assert np.array_equal(read_mask(path), _disk())


def test_class_maps_read_every_label_as_foreground_and_gray_masks_keep_127() -> None:
    labels = np.zeros((8, 8), np.uint16)
    labels[1:3, 1:3], labels[5:7, 5:7] = 1, 2  # a two-class map in a 16-bit file
    assert binarize_mask(labels, None).sum() == 8
    soft = np.zeros((8, 8), np.uint8)
    soft[2:6, 2:6] = 200
    soft[2, 2:6] = 90  # an anti-aliased edge: gray levels, thresholded at 127 as the released code does
    assert binarize_mask(soft, None).sum() == 12
    noise = np.arange(64, dtype=np.uint8).reshape(8, 8)  # 64 levels ≤ 127: not a label map; stays empty at 127
    assert not binarize_mask(noise, None).any()


def test_read_mask_files_and_errors(tmp_path: Path) -> None:
    mask = _disk().astype(np.uint16) * np.uint16(65535)
    cv2.imwrite(str(tmp_path / "m16.png"), mask)
    cv2.imwrite(str(tmp_path / "m3.png"), np.repeat((_disk() * 255)[..., None], 3, axis=2))
    for name in ("m16.png", "m3.png"):
        out = read_mask(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (32, 32) and np.array_equal(out, _disk())
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_mask(tmp_path / "missing.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        read_mask(tmp_path / "broken.png")


def test_mask_to_png_strict() -> None:
    png = mask_to_png(_disk())
    assert png.dtype == np.uint8 and png.ndim == 2 and set(np.unique(png).tolist()) == {0, 255}
    assert np.array_equal(mask_to_png(_disk().astype(bool)), png)
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_to_png(_disk() * 255)  # would wrap around to 1 if multiplied blindly
    with pytest.raises(ValueError, match="single-channel"):
        mask_to_png(np.zeros((4, 4, 3), np.uint8))


def test_resize_mask_nearest_stays_binary() -> None:
    mask = _disk(37, 9, (15, 20))
    for size in (16, 64, (20, 50)):
        out = resize_mask(mask, size)
        assert set(np.unique(out).tolist()) == {0, 1}
    assert resize_mask(mask, 64).shape == (64, 64) and resize_mask(mask, (20, 50)).shape == (20, 50)


def test_augment_mask_changes_stays_binary_and_is_deterministic() -> None:
    mask = _disk(64, 10, (20, 24))
    outputs = [augment_mask(mask, np.random.default_rng(seed)) for seed in range(8)]
    for out in outputs:
        assert out.shape == mask.shape and out.dtype == np.uint8
        assert set(np.unique(out).tolist()) <= {0, 1}
    assert sum(not np.array_equal(out, mask) for out in outputs) >= 7
    again = augment_mask(mask, np.random.default_rng(3))
    assert np.array_equal(again, outputs[3])
    assert MaskAugment().apply(mask, np.random.default_rng(3)).tolist() == outputs[3].tolist()


def test_mask_augment_components() -> None:
    mask = _disk(64, 10, (20, 24))
    rng = np.random.default_rng(0)
    assert np.array_equal(MaskAugment(1.0, 0.0, (1.0, 1.0), 0.0).apply(mask, rng), mask[:, ::-1])
    assert np.array_equal(MaskAugment(0.0, 1.0, (1.0, 1.0), 0.0).apply(mask, rng), mask[::-1, :])
    assert np.array_equal(MaskAugment(0.0, 0.0, (1.0, 1.0), 0.0).apply(mask, rng), mask)
    grown = MaskAugment(0.0, 0.0, (1.5, 1.5), 0.0).apply(mask, rng)
    assert 1.8 < grown.sum() / mask.sum() < 2.7  # area scales with scale**2 = 2.25
    with pytest.raises(ValueError, match="scale_range"):
        MaskAugment(scale_range=(1.2, 0.8))
    with pytest.raises(ValueError, match="flip_p"):
        MaskAugment(flip_p=1.5)


# ---------------------------------------------------------------------------------------------------- datasets


def _check_item(item: dict, resolution: int, hint_resolution: int) -> None:
    image, mask_hint, image_hint = item["image"], item["mask_hint"], item["image_hint"]
    assert image.dtype == mask_hint.dtype == image_hint.dtype == torch.float32
    assert image.shape == (3, resolution, resolution)
    assert mask_hint.shape == image_hint.shape == (3, hint_resolution, hint_resolution)
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert image_hint.min() >= 0.0 and image_hint.max() <= 1.0
    assert set(torch.unique(mask_hint).tolist()) <= {0.0, 1.0}
    assert torch.equal(mask_hint[0], mask_hint[1]) and torch.equal(mask_hint[0], mask_hint[2])
    assert isinstance(item["prompt"], str) and isinstance(item["name"], str)


def test_mask_image_dataset_outputs(tmp_path: Path) -> None:
    source, target = _write_pair(tmp_path, "case1", size=(40, 60))
    (tmp_path / "prompt.json").write_text(
        json.dumps({"source": "masks/case1.png", "target": "images/case1.jpg", "prompt": "A photo of a polyp."}) + "\n"
    )
    item = MaskImageDataset(tmp_path, resolution=32)[0]
    _check_item(item, 32, 32)
    assert item["name"] == "case1" and item["prompt"] == "A photo of a polyp."
    assert torch.equal(item["image_hint"], (item["image"] + 1) / 2)
    # RGB order: compare with the file read by OpenCV (BGR) and resized the same way.
    bgr = cv2.resize(cv2.imread(str(target)), (32, 32), interpolation=cv2.INTER_AREA)
    expected = torch.from_numpy(bgr[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(item["image"], expected, atol=1e-6)
    # The mask: rows 5..24, cols 10..39 of a 40x60 mask, nearest-resized to 32x32 (the faint pixel is dropped).
    expected_mask = cv2.resize((cv2.imread(str(source), 0) > 127).astype(np.uint8), (32, 32), interpolation=0)
    assert np.array_equal(item["mask_hint"][0].numpy(), expected_mask)

    enlarged = MaskImageDataset(tmp_path / "prompt.json", 96, hint_resolution=48, prompt_override="")[0]
    _check_item(enlarged, 96, 48)
    assert enlarged["prompt"] == ""


def test_mask_image_dataset_rejects_misaligned_pair(tmp_path: Path) -> None:
    _write_pair(tmp_path, "a", size=(40, 60))
    cv2.imwrite(str(tmp_path / "masks" / "a.png"), np.zeros((40, 40), np.uint8))
    (tmp_path / "prompt.json").write_text(json.dumps({"source": "masks/a.png", "target": "images/a.jpg", "prompt": ""}))
    with pytest.raises(ValueError, match="aspect ratios differ"):
        MaskImageDataset(tmp_path, 32)[0]


def test_synthetic_dataset_deterministic_distinct_and_valid() -> None:
    dataset = SyntheticLesionDataset(num_samples=6, resolution=64, seed=7)
    again = SyntheticLesionDataset(num_samples=6, resolution=64, seed=7)
    other_seed = SyntheticLesionDataset(num_samples=6, resolution=64, seed=8)
    items = [dataset[i] for i in range(6)]
    for index, item in enumerate(items):
        _check_item(item, 64, 64)
        assert torch.equal(item["image"], again[index]["image"])
        assert torch.equal(item["mask_hint"], again[index]["mask_hint"])
        assert not torch.equal(item["image"], other_seed[index]["image"])
        assert torch.equal(item["image_hint"], (item["image"] + 1) / 2)
        fraction = item["mask_hint"][0].mean().item()
        assert 0.01 < fraction < 0.6, fraction
        # The lesion is visible: its mean colour differs clearly from the surrounding tissue.
        inside = item["image"][:, item["mask_hint"][0] > 0].mean(dim=1)
        outside = item["image"][:, item["mask_hint"][0] == 0].mean(dim=1)
        assert (inside - outside).abs().max() > 0.1
    assert items[0]["name"] == "synthetic_000000" and items[0]["prompt"] == "A photo of a polyp."
    for i in range(6):
        for j in range(i + 1, 6):
            assert not torch.equal(items[i]["mask_hint"], items[j]["mask_hint"])
    assert torch.equal(dataset[-1]["image"], items[5]["image"])
    with pytest.raises(IndexError):
        dataset[6]
    _check_item(SyntheticLesionDataset(2, 32, hint_resolution=64)[1], 32, 64)


def test_synthetic_tiny_resolution_mask_not_empty_or_full() -> None:
    for index in range(20):
        _, mask = synthetic_pair(index, 4, seed=1)
        assert 0 < mask.sum() < mask.size


def test_write_synthetic_dataset_round_trip(tmp_path: Path) -> None:
    prompt_file = write_synthetic_dataset(tmp_path / "toy", num_samples=3, resolution=32, seed=5)
    assert prompt_file == tmp_path / "toy" / "prompt.json"
    assert not list((tmp_path / "toy").glob("*.tmp"))
    lines = prompt_file.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["source"] == "masks/synthetic_000000.png"
    png = cv2.imread(str(tmp_path / "toy" / "masks" / "synthetic_000001.png"), cv2.IMREAD_UNCHANGED)
    assert png.ndim == 2 and set(np.unique(png).tolist()) == {0, 255}

    from_disk = MaskImageDataset(tmp_path / "toy", resolution=32)
    generated = SyntheticLesionDataset(3, 32, seed=5)
    assert len(from_disk) == 3
    for index in range(3):
        a, b = from_disk[index], generated[index]
        for key in ("image", "mask_hint", "image_hint", "prompt", "name"):
            assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key

    with pytest.raises(FileExistsError, match="prompt.json"):
        write_synthetic_dataset(tmp_path / "toy", 1, 32)
    write_synthetic_dataset(tmp_path / "toy", 1, 32, overwrite=True)
    assert len(read_prompt_jsonl(prompt_file)) == 1


def test_default_collate_batches_dicts() -> None:
    loader = DataLoader(SyntheticLesionDataset(5, 32, seed=2), batch_size=2, shuffle=False)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 32, 32) and batch["mask_hint"].shape == (2, 3, 32, 32)
    assert batch["image_hint"].shape == (2, 3, 32, 32)
    assert batch["prompt"] == ["A photo of a polyp."] * 2 and batch["name"] == ["synthetic_000000", "synthetic_000001"]
    assert len(list(loader)) == 3


def test_demo_data_cli_writes_the_training_layout(tmp_path):
    from tools import demo_data

    assert demo_data.main([str(tmp_path / "demo"), "--samples", "3", "--resolution", "32"]) == 0
    assert len(list((tmp_path / "demo" / "masks").glob("*.png"))) == 3
    assert len(MaskImageDataset(tmp_path / "demo", 32)) == 3
    assert demo_data.main([str(tmp_path / "demo"), "--samples", "3"]) == 1  # prompt.json exists: refused
    assert demo_data.main([str(tmp_path / "demo"), "--samples", "3", "--force"]) == 0


# ------------------------------------------------------------------------------------------------ intensities


def _twelve_bit(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(5)
    raw = rng.integers(200, 3800, (16, 24)).astype(np.uint16)  # 12-bit data in a 16-bit file (CT, X-ray)
    raw[0, 0], raw[0, 1] = 100, 4000
    path = tmp_path / "ct.png"
    cv2.imwrite(str(path), raw)
    return path, raw.astype(np.float64)


def test_twelve_bit_images_are_not_near_black_and_each_mode_maps_as_documented(tmp_path: Path) -> None:
    from siamese.data.images import parse_intensity, read_image_rgb

    path, raw = _twelve_bit(tmp_path)
    full = read_image_rgb(path, "full_range")[..., 0]
    assert full.max() <= 15 and np.array_equal(full, (raw // 257).astype(np.uint8))  # the defect, as a mode
    auto = read_image_rgb(path)[..., 0]
    assert np.array_equal(auto, np.rint(raw * 255 / 4095).astype(np.uint8)) and auto.max() == 249
    minmax = read_image_rgb(path, "minmax")[..., 0]
    assert minmax.min() == 0 and minmax.max() == 255
    assert np.array_equal(minmax, np.rint((raw - 100) * 255 / 3900).astype(np.uint8))
    low, high = np.percentile(raw, (2, 98))
    window = read_image_rgb(path, "percentile:2,98")[..., 0]
    assert np.array_equal(window, np.clip(np.rint((raw - low) * 255 / (high - low)), 0, 255).astype(np.uint8))
    # A full-range 16-bit file keeps the exact ÷257 of before; 8-bit files are untouched by auto.
    wide = (raw * 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    assert np.array_equal(read_image_rgb(tmp_path / "wide.png")[..., 0], (wide // 257).astype(np.uint8))
    assert str(parse_intensity("percentile:1,99")) == "percentile:1,99"
    for bad, message in (("gamma", "not one of"), ("minmax:1,2", "only 'percentile'"),
                         ("percentile:9,1", "low < high"), ("percentile:x", "percentile:LOW,HIGH")):
        with pytest.raises(ValueError, match=message):
            parse_intensity(bad)


def test_float_images_and_the_config_setting(tmp_path: Path) -> None:
    from siamese.config import ConfigError, load_config
    from siamese.data.images import image_to_rgb8

    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    assert image_to_rgb8(unit)[..., 0].max() == 255
    hounsfield = np.linspace(-1000, 2000, 12, dtype=np.float32).reshape(3, 4)
    assert image_to_rgb8(hounsfield)[..., 0].tolist()[0][0] == 0  # auto: min-max for floats outside [0, 1]
    with pytest.raises(ValueError, match=r"float values in \[-1000, 2000\], not \[0, 1\]; set data.intensity"):
        image_to_rgb8(hounsfield, "x.tif", "full_range")
    with pytest.raises(ValueError, match="NaN"):
        image_to_rgb8(np.full((2, 2), np.nan, np.float32))
    assert load_config(None, ["data.intensity=percentile:1,99"]).data.intensity == "percentile:1,99"
    with pytest.raises(ConfigError, match="data.intensity"):
        load_config(None, ["data.intensity=window"])


def test_doctor_names_near_black_images_and_the_setting_that_fixes_them(tmp_path: Path) -> None:
    from siamese.data.check import check_dataset

    path, _ = _twelve_bit(tmp_path)
    root = tmp_path / "d"
    (root / "masks").mkdir(parents=True)
    cv2.imwrite(str(root / "masks" / "ct.png"), np.pad(np.full((8, 8), 255, np.uint8), ((4, 4), (8, 8))))
    (root / "prompt.json").write_text(json.dumps({"source": "masks/ct.png", "target": str(path), "prompt": "ct"}))
    found = {f.code: f for f in check_dataset(root, resolution=16, progress=False, intensity="full_range")}
    assert "near_black_image" in found and "data.intensity: percentile stretches it" in found["near_black_image"]\
        .examples[0]
    found = {f.code: f for f in check_dataset(root, resolution=16, progress=False)}
    assert "near_black_image" not in found and "→ 249 by data.intensity auto" in found["image_16bit"].examples[0]
