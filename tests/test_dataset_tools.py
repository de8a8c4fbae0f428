"""Dataset tools for users' own data: ``tools.prepare_data`` (folders → training layout), ``tools.doctor`` (one
finding per problem kind, exit code 1 on errors), and the loader rules they rely on: gray / 16-bit images, 0/1
label masks under ``data.mask_threshold``, and the header-only aspect check ``MaskImageDataset.check_pairs``.

Every dataset is written by the test itself with ``cv2.imwrite`` into ``tmp_path``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import numpy as np
import pytest

from siamese.config import ConfigError, load_config
from siamese.data.check import Finding, check_dataset, format_findings
from siamese.data.datasets import MaskImageDataset
from siamese.data.images import read_image_rgb
from siamese.data.prepare import prepare_dataset
from siamese.factory import build_dataset
from tools import doctor, prepare_data

SIZE = 32


def _image(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(*size, 3), dtype=np.uint8)


def _mask(size: tuple[int, int] = (SIZE, SIZE), value: int = 255) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    cv2.circle(mask, (size[1] // 2, size[0] // 2), min(size) // 4, value, -1)
    return mask


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array), path
    return path


def _dataset(root: Path, pairs: list[tuple[np.ndarray, np.ndarray]], extra_lines: tuple[str, ...] = (),
             image_ext: str = ".png") -> Path:
    """root/images/pNN<ext>, root/masks/pNN.png and root/prompt.json (one line per pair, then extra_lines)."""
    lines = []
    for index, (image, mask) in enumerate(pairs):
        _write(root / "images" / f"p{index:02d}{image_ext}", image)
        _write(root / "masks" / f"p{index:02d}.png", mask)
        lines.append(json.dumps({"source": f"masks/p{index:02d}.png", "target": f"images/p{index:02d}{image_ext}",
                                 "prompt": "A photo of a polyp."}))
    (root / "prompt.json").write_text("\n".join([*lines, *extra_lines]) + "\n", encoding="utf-8")
    return root


def _clean_pairs(count: int = 2) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(_image(seed), _mask()) for seed in range(count)]


def _doctor(root: Path, *args: str) -> tuple[int, dict[str, Finding]]:
    """The CLI's exit code and the library's findings by code, for the same arguments."""
    rc = doctor.main([str(root), "--resolution", str(SIZE), *args])
    threshold = None
    if "--mask-threshold" in args:
        value = args[args.index("--mask-threshold") + 1]
        threshold = None if value == "auto" else int(value)
    findings = check_dataset(root, resolution=SIZE, threshold=threshold, progress=False)
    return rc, {f.code: f for f in findings}


# ---------------------------------------------------------------------------------------------------- prepare_data


def _folders(tmp_path: Path, mask_names: dict[str, str], images: tuple[str, ...]) -> tuple[Path, Path]:
    """tmp/in_images/<images>, tmp/in_masks/<mask file> for each image stem in mask_names."""
    for seed, name in enumerate(images):
        _write(tmp_path / "in_images" / name, _image(seed))
    for name in mask_names.values():
        _write(tmp_path / "in_masks" / name, _mask())
    return tmp_path / "in_images", tmp_path / "in_masks"


def _lines(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "prompt.json").read_text().splitlines()]


def test_prepare_pairs_by_stem_across_extensions_and_reports_leftovers(tmp_path, caplog):
    masks_by_stem = {"a": "a.png", "b": "b.png", "orphan": "orphan.png"}
    images, masks = _folders(tmp_path, masks_by_stem, ("a.jpg", "b.jpg", "c.jpg"))
    _write(images / ".hidden.jpg", _image())  # hidden: skipped
    _write(images / "sub" / "d.jpg", _image())  # in a sub-folder: not searched
    _write(masks / "sub" / "d.png", _mask())
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert prepare_data.main(["--images", str(images), "--masks", str(masks), "--out", str(out)]) == 0
    assert _lines(out) == [
        {"source": "masks/a.png", "target": "images/a.jpg", "prompt": "A photo of a polyp."},
        {"source": "masks/b.png", "target": "images/b.jpg", "prompt": "A photo of a polyp."},
    ]
    assert not (out / "images" / "a.jpg").is_symlink()
    assert (out / "images" / "a.jpg").read_bytes() == (images / "a.jpg").read_bytes()
    assert "2 pairs" in caplog.text and "1 images without a mask (skipped): c.jpg" in caplog.text
    assert "1 masks without an image (skipped): orphan.png" in caplog.text
    dataset = MaskImageDataset(out, 32)
    assert len(dataset) == 2 and dataset[0]["mask_hint"].sum() > 0


def test_prepare_detects_isic_segmentation_suffix_and_renames_masks(tmp_path):
    names = {f"ISIC_00{i}": f"ISIC_00{i}_segmentation.png" for i in range(3)}
    images, masks = _folders(tmp_path, names, tuple(f"{stem}.jpg" for stem in names))
    pairing = prepare_dataset(images, masks, tmp_path / "out", prompt="A dermoscopy image.")
    assert pairing.suffix == "_segmentation" and pairing.detected and len(pairing.pairs) == 3
    assert _lines(tmp_path / "out")[0] == {"source": "masks/ISIC_000.png", "target": "images/ISIC_000.jpg",
                                           "prompt": "A dermoscopy image."}
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [f"{s}.png" for s in names]


def test_prepare_explicit_mask_suffix_and_zero_pairs(tmp_path, caplog):
    images, masks = _folders(tmp_path, {"a": "a_annot.png", "b": "b_annot.png"}, ("a.jpg", "b.jpg"))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        # "_annot" is not a recognised suffix: nothing pairs → one-line error, exit 1, nothing written.
        assert prepare_data.main(["--images", str(images), "--masks", str(masks), "--out", str(out)]) == 1
    assert "no image/mask pairs" in caplog.text and "--mask-suffix" in caplog.text
    assert not (out / "prompt.json").exists()
    assert prepare_data.main(["--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--mask-suffix", "_annot"]) == 0
    assert [line["source"] for line in _lines(out)] == ["masks/a.png", "masks/b.png"]


def test_prepare_ambiguous_suffix_asks_for_it(tmp_path, caplog):
    images, masks = _folders(tmp_path, {"a": "a_mask.png", "b": "b_seg.png"}, ("a.jpg", "b.jpg"))
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        assert prepare_data.main(["--images", str(images), "--masks", str(masks), "--out", str(out)]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "'_mask' and '_seg'" in errors[0] and "--mask-suffix" in errors[0]
    assert prepare_data.main(["--images", str(images), "--masks", str(masks), "--out", str(out),
                              "--mask-suffix", "_seg"]) == 0
    assert _lines(out) == [{"source": "masks/b.png", "target": "images/b.jpg", "prompt": "A photo of a polyp."}]


def test_prepare_link_and_refusing_an_existing_prompt_json(tmp_path):
    images, masks = _folders(tmp_path, {"a": "a.png", "b": "b.png"}, ("a.jpg", "b.jpg"))
    out = tmp_path / "out"
    argv = ["--images", str(images), "--masks", str(masks), "--out", str(out), "--link"]
    assert prepare_data.main(argv) == 0
    link = out / "images" / "a.jpg"
    assert link.is_symlink() and link.resolve() == (images / "a.jpg").resolve()
    assert len(MaskImageDataset(out, 32)) == 2
    before = (out / "prompt.json").read_text()
    assert prepare_data.main([*argv, "--prompt", "other"]) == 1  # prompt.json exists: refused, untouched
    assert (out / "prompt.json").read_text() == before
    assert prepare_data.main([*argv, "--prompt", "other", "--force"]) == 0
    assert {line["prompt"] for line in _lines(out)} == {"other"}
    assert (images / "a.jpg").is_file() and not (images / "a.jpg").is_symlink()  # the originals are untouched


# ---------------------------------------------------------------------------------------------------- doctor


def test_doctor_clean_dataset_prints_a_table_and_exits_0(tmp_path, capsys):
    root = _dataset(tmp_path / "d", _clean_pairs(3))
    assert doctor.main([str(root), "--resolution", str(SIZE)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["SEVERITY", "CODE", "COUNT", "WHAT"]
    rows = [line.split() for line in out.splitlines()[1:] if not line.startswith(" ")]
    assert rows == [["info", "checked", "3", "pairs", "read", "and", "checked"]]
    # The JSONL file itself works as ROOT too.
    assert doctor.main([str(root / "prompt.json"), "--resolution", str(SIZE)]) == 0


def test_doctor_lists_every_bad_jsonl_line_with_its_number(tmp_path):
    good = json.dumps({"source": "masks/p00.png", "target": "images/p00.png", "prompt": "p"})
    bad = ("{not json", '["masks/p00.png"]', '{"source": "masks/p00.png", "prompt": "p"}',
           '{"source": "masks/p00.png", "target": "images/p00.png", "prompt": 3}')
    root = _dataset(tmp_path / "d", _clean_pairs(1), extra_lines=(*bad, "", good))
    rc, found = _doctor(root)
    assert rc == 1 and found["bad_line"].severity == "error" and found["bad_line"].count == 4
    assert "lines 2, 3, 4, 5" in found["bad_line"].what
    assert found["bad_line"].examples[0].startswith("line 2: invalid JSON")
    assert found["checked"].count == 2  # the good lines are still checked


def test_doctor_empty_prompt_file(tmp_path):
    (tmp_path / "prompt.json").write_text("\n")
    rc, found = _doctor(tmp_path)
    assert rc == 1 and found["no_records"].severity == "error"


def test_doctor_missing_and_unreadable_files(tmp_path):
    root = _dataset(tmp_path / "d", _clean_pairs(2),
                    extra_lines=(json.dumps({"source": "masks/gone.png", "target": "images/p00.png", "prompt": ""}),))
    (root / "images" / "p01.png").write_bytes(b"not an image at all")
    rc, found = _doctor(root)
    assert rc == 1
    assert found["missing_file"].severity == "error" and found["missing_file"].examples == ["line 3: masks/gone.png"]
    assert found["unreadable_file"].count == 1 and "images/p01.png" in found["unreadable_file"].examples[0]


def test_doctor_aspect_mismatch_is_an_error(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(), _mask((SIZE, 2 * SIZE)))])
    rc, found = _doctor(root)
    assert rc == 1 and found["aspect_mismatch"].severity == "error"
    assert found["aspect_mismatch"].examples == ["line 1: image 32×32, mask 32×64"]


def test_doctor_size_mismatch_with_same_aspect_is_info(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(), _mask((2 * SIZE, 2 * SIZE)))])
    rc, found = _doctor(root)
    assert rc == 0 and found["size_mismatch"].severity == "info" and "aspect_mismatch" not in found


def test_doctor_names_multiclass_masks_with_their_histogram(tmp_path):
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:14, 4:14] = 128
    mask[18:28, 18:28] = 255
    root = _dataset(tmp_path / "d", [(_image(), mask)])
    rc, found = _doctor(root)
    assert rc == 0 and found["multiclass_mask"].severity == "warning"
    example = found["multiclass_mask"].examples[0]
    assert "gray 0: 80.5%, 128: 9.8%, 255: 9.8%" in example and "foreground 19.5%" in example  # 128 and 255 merge


def test_doctor_jpeg_mask_is_non_binary_not_multiclass(tmp_path):
    noisy = cv2.imdecode(cv2.imencode(".jpg", _mask((64, 64)), [cv2.IMWRITE_JPEG_QUALITY, 60])[1], 0)
    assert len(np.unique(noisy)) > 2
    root = _dataset(tmp_path / "d", [(_image(size=(64, 64)), noisy)])
    rc, found = _doctor(root)
    assert rc == 0 and found["nonbinary_mask"].severity == "warning" and "multiclass_mask" not in found
    assert "more levels" in found["nonbinary_mask"].examples[0]


def test_doctor_label_masks_warn_under_auto_and_fail_under_an_explicit_threshold(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(), _mask(value=1)), (_image(1), _mask())])
    rc, found = _doctor(root)
    assert rc == 0 and found["label_mask"].severity == "warning" and found["label_mask"].count == 1
    assert "read correctly as foreground = value 1" in found["label_mask"].what and "empty_mask" not in found
    rc, found = _doctor(root, "--mask-threshold", "127")
    assert rc == 1 and found["label_mask"].severity == "error" and "EMPTY" in found["label_mask"].what
    assert found["empty_mask"].count == 1


def test_doctor_reads_resolution_and_threshold_from_the_config(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(), _mask(value=1))])
    config = tmp_path / "cfg.yaml"
    config.write_text(f"data:\n  root: {root}\n  resolution: 64\n  mask_threshold: 127\n")
    assert doctor.main(["--config", str(config)]) == 1  # label masks emptied by the config's threshold
    found = {f.code: f for f in check_dataset(root, resolution=64, threshold=127, progress=False)}
    assert found["small_image"].count == 1 and "resolution 64" in found["small_image"].what
    assert doctor.main(["--config", str(config), "--mask-threshold", "auto"]) == 0


def test_doctor_empty_and_full_masks(tmp_path):
    empty, full = np.zeros((SIZE, SIZE), np.uint8), np.full((SIZE, SIZE), 255, np.uint8)
    root = _dataset(tmp_path / "d", [(_image(0), empty), (_image(1), full), (_image(2), _mask())])
    rc, found = _doctor(root)
    assert rc == 0 and found["empty_mask"].severity == found["full_mask"].severity == "warning"
    assert found["empty_mask"].examples[0].startswith("line 1: masks/p00.png")
    assert found["full_mask"].examples[0].startswith("line 2: masks/p01.png")
    # Every mask empty: nothing to learn → an error. A red-on-black mask is reduced to luma 76: two levels ≤ 127,
    # read as a label (it was empty under gray > 127); under an explicit threshold 127 it is empty, and said so.
    red = np.zeros((SIZE, SIZE, 3), np.uint8)
    red[8:24, 8:24] = (0, 0, 255)
    rc, found = _doctor(_dataset(tmp_path / "e", [(_image(0), empty), (_image(1), empty)]))
    assert rc == 1 and found["empty_mask"].severity == "error"
    rc, found = _doctor(_dataset(tmp_path / "r", [(_image(0), red), (_image(1), _mask())]))
    assert rc == 0 and "empty_mask" not in found and found["colour_mask"].severity == "info"
    rc, found = _doctor(_dataset(tmp_path / "t", [(_image(0), red), (_image(1), _mask())]), "--mask-threshold", "127")
    assert "max gray 76 ≤ threshold 127" in found["empty_mask"].examples[0]


def test_doctor_duplicate_content_and_paths(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(0), _mask()), (_image(0), _mask()), (_image(2), _mask())])
    repeated = json.dumps({"source": "masks/p02.png", "target": "images/p02.png", "prompt": "again"})
    with (root / "prompt.json").open("a") as handle:
        handle.write(repeated + "\n")
    rc, found = _doctor(root)
    assert rc == 0
    assert found["duplicate_image"].severity == "warning" and found["duplicate_image"].count == 1
    assert found["duplicate_image"].examples == ["images/p00.png = images/p01.png"]
    assert found["duplicate_path"].count == 2  # the image and the mask of line 4 repeat line 3's
    assert found["duplicate_path"].examples[0] == "image images/p02.png (lines 3, 4)"


def test_doctor_gray_16bit_and_alpha_images_are_infos(tmp_path):
    gray = _image(0)[:, :, 0]
    wide = _image(1).astype(np.uint16) * np.uint16(257)
    bgra = np.dstack([_image(2), np.full((SIZE, SIZE), 128, np.uint8)])
    root = _dataset(tmp_path / "d", [(gray, _mask()), (wide, _mask()), (bgra, _mask())])
    rc, found = _doctor(root)
    assert rc == 0
    assert found["gray_image"].severity == found["image_16bit"].severity == found["alpha_image"].severity == "info"
    assert found["gray_image"].examples == ["line 1: images/p00.png"]
    assert "replicated" in found["gray_image"].what and "data.intensity" in found["image_16bit"].what
    assert found["image_16bit"].examples[0].startswith("line 2: images/p01.png")


def test_doctor_small_and_non_square_images(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(0, (24, 48)), _mask((24, 48))), (_image(1), _mask())])
    rc, found = _doctor(root)
    assert rc == 0
    assert found["small_image"].severity == "warning" and found["small_image"].count == 1
    assert found["non_square"].severity == "info" and found["non_square"].examples == ["line 1: images/p00.png (24×48)"]
    table = format_findings(check_dataset(root, resolution=SIZE, progress=False))
    assert "small_image" in table and "non_square" in table and "e.g. line 1: images/p00.png (24×48)" in table


# ---------------------------------------------------------------------------------------------------- loading


def test_gray_and_16bit_images_load_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 30000, 65535]], np.uint16)
    expected = [0, 3, 116, 255]  # value // 257: scaled, 65535 → 255 (never clipped at 255)
    for name, array in (("g16.png", values), ("g16.tif", values), ("c16.png", np.dstack([values] * 3))):
        rgb = read_image_rgb(_write(tmp_path / name, array))
        assert rgb.dtype == np.uint8 and rgb.shape == (1, 4, 3), name
        assert rgb[..., 0].tolist() == rgb[..., 1].tolist() == rgb[..., 2].tolist() == [expected], name
    gray8 = read_image_rgb(_write(tmp_path / "g8.png", np.array([[0, 7, 200]], np.uint8)))
    assert gray8.shape == (1, 3, 3) and (gray8 == np.array([0, 7, 200])[None, :, None]).all()
    bgra = np.array([[[10, 20, 30, 0]]], np.uint8)  # fully transparent: alpha is dropped, not composited
    assert read_image_rgb(_write(tmp_path / "a.png", bgra)).tolist() == [[[30, 20, 10]]]
    # Through the dataset: a 16-bit white image is white (1.0), not clipped or darkened.
    root = _dataset(tmp_path / "d", [(np.full((SIZE, SIZE), 65535, np.uint16), _mask())])
    assert float(MaskImageDataset(root, SIZE)[0]["image"].min()) == 1.0


def test_label_masks_read_by_the_automatic_threshold(tmp_path, caplog):
    label = _mask(value=1)
    root = _dataset(tmp_path / "d", [(_image(0), label), (_image(1), _mask())])
    with caplog.at_level(logging.INFO, logger="siamese.data"):
        dataset = MaskImageDataset(root, SIZE)
    assert "label images (class values ≤ 127) detected (1 of 2 files)" in caplog.text
    assert np.array_equal(dataset[0]["mask_hint"][0].numpy(), label.astype(np.float32))
    assert np.array_equal(dataset[1]["mask_hint"][0].numpy(), (_mask() > 127).astype(np.float32))
    # An explicit threshold keeps today's rule: 0/1 masks are empty at 127, read at 0.
    assert MaskImageDataset(root, SIZE, threshold=127)[0]["mask_hint"].sum() == 0
    assert np.array_equal(MaskImageDataset(root, SIZE, threshold=0)[0]["mask_hint"][0].numpy(), label)
    # data.mask_threshold reaches the dataset through the factory, and is validated.
    cfg = load_config(None, [f"data.root={root}", "data.resolution=64", "data.mask_threshold=127"])
    assert build_dataset(cfg).threshold == 127
    assert build_dataset(load_config(None, [f"data.root={root}", "data.resolution=64"])).threshold is None
    with pytest.raises(ConfigError, match="data.mask_threshold"):
        load_config(None, ["data.mask_threshold=255"])


def test_check_pairs_finds_aspect_mismatch_from_headers(tmp_path):
    root = _dataset(tmp_path / "d", [(_image(0), _mask()), (_image(1), _mask((SIZE, 2 * SIZE))),
                                     (_image(2), _mask((2 * SIZE, SIZE))), (_image(3), _mask((64, 64)))])
    # Truncate a good pair's image after its header: only the header is read, so this pair still passes.
    data = (root / "images" / "p00.png").read_bytes()
    (root / "images" / "p00.png").write_bytes(data[:64])
    dataset = MaskImageDataset(root, SIZE)
    with pytest.raises(ValueError, match=r"2 of 4 pairs cannot line up; first: record 1: mask .*p01\.png is 32×64"):
        dataset.check_pairs()
    good = _dataset(tmp_path / "good", [(_image(0), _mask()), (_image(1, (20, 40)), _mask((40, 80)))])
    MaskImageDataset(good, SIZE).check_pairs()
