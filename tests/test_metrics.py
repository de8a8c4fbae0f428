"""Segmentation metrics (Dice, IoU, precision, recall, HD95), their empty-mask conventions, the threshold sweep and
the ``tools.score_masks`` command line."""

from __future__ import annotations

import csv
import json
import logging
import math

import ldm  # noqa: F401  (torchvision shim first)

import cv2
import numpy as np
import pytest

from siamese.evaluation.metrics import (
    SWEEP_THRESHOLDS,
    MaskScores,
    dice,
    hd95,
    iou,
    mask_scores,
    precision,
    probability_scores,
    recall,
    summarize,
)
from tools import score_masks

# ------------------------------------------------------------------------------------------ reference HD95


def _surface_points(mask: np.ndarray) -> np.ndarray:
    """Foreground pixels with a background 4-neighbour (outside the image is background), as (row, col) points."""
    padded = np.pad(mask.astype(bool), 1, constant_values=False)
    centre = padded[1:-1, 1:-1]
    all_neighbours = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.argwhere(centre & ~all_neighbours).astype(np.float64)


def _reference_hd95(a: np.ndarray, b: np.ndarray, pooled: bool = False) -> float:
    """Brute force over explicit point sets: every surface-to-surface distance, nearest per point, 95th percentile
    per direction and the larger of the two (``pooled``: medpy's percentile of both directions together)."""
    pa, pb = _surface_points(a), _surface_points(b)
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(axis=-1))
    a_to_b, b_to_a = distances.min(axis=1), distances.min(axis=0)
    if pooled:
        return float(np.percentile(np.concatenate([a_to_b, b_to_a]), 95))
    return float(max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95)))


def _blob(rng: np.random.Generator, shape: tuple[int, int] = (40, 36)) -> np.ndarray:
    noise = cv2.GaussianBlur(rng.random(shape), (0, 0), 2.5)
    return noise > np.quantile(noise, rng.uniform(0.55, 0.9))


def _square(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[top:top + size, left:left + size] = 1
    return mask


# ------------------------------------------------------------------------------------------ per-image metrics


def test_identical_and_disjoint_masks():
    a = _square((16, 16), 2, 2, 6)
    assert mask_scores(a, a) == MaskScores(1.0, 1.0, 1.0, 1.0, 0.0)
    b = _square((16, 16), 9, 9, 5)
    s = mask_scores(a, b)
    assert (s.dice, s.iou, s.precision, s.recall) == (0.0, 0.0, 0.0, 0.0)
    assert s.hd95 > 0 and math.isfinite(s.hd95)


def test_known_partial_overlap():
    pred = np.zeros((8, 8), np.uint8)
    pred[0:4, 0:4] = 255  # 16 pixels; any non-zero value is foreground
    target = np.zeros((8, 8), bool)
    target[2:4, 0:6] = True  # 12 pixels, 8 of them inside pred
    expected = {"dice": 2 * 8 / (16 + 12), "iou": 8 / 20, "precision": 8 / 16, "recall": 8 / 12}
    s = mask_scores(pred, target)
    for name, value in expected.items():
        assert getattr(s, name) == pytest.approx(value, abs=1e-12)
    assert (dice(pred, target), iou(pred, target), precision(pred, target), recall(pred, target)) == pytest.approx(
        tuple(expected.values()), abs=1e-12)
    assert precision(target, pred) == pytest.approx(8 / 12) and recall(target, pred) == pytest.approx(8 / 16)
    with pytest.raises(ValueError, match="different shapes"):
        mask_scores(pred, target[:7])


def test_empty_mask_conventions():
    empty, lesion = np.zeros((10, 10), np.uint8), _square((10, 10), 3, 3, 4)
    assert mask_scores(empty, empty) == MaskScores(1.0, 1.0, 1.0, 1.0, 0.0)  # a correct "no lesion"
    assert (dice(empty, empty), iou(empty, empty), hd95(empty, empty)) == (1.0, 1.0, 0.0)
    for pred, target in ((empty, lesion), (lesion, empty)):  # missed lesion; lesion where there is none
        s = mask_scores(pred, target)
        assert (s.dice, s.iou, s.precision, s.recall) == (0.0, 0.0, 0.0, 0.0)
        assert math.isnan(s.hd95) and not s.hd95_defined and math.isnan(hd95(pred, target))


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("axis", [0, 1])
def test_hd95_of_two_squares_offset_by_k_pixels_is_k(k, axis):
    a = _square((48, 48), 10, 10, 20)
    b = np.roll(a, k, axis=axis)
    assert hd95(a, b) == pytest.approx(k, abs=1e-12)
    assert _reference_hd95(a, b) == pytest.approx(k, abs=1e-12)


def test_hd95_matches_the_point_set_reference_on_random_blobs():
    rng = np.random.default_rng(1)
    differs_from_pooled = 0
    for _ in range(25):
        a, b = _blob(rng), _blob(rng)
        expected = _reference_hd95(a, b)
        assert hd95(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert hd95(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-9)  # symmetric
        differs_from_pooled += abs(_reference_hd95(a, b, pooled=True) - expected) > 1e-6
    # The blobs tell MONAI's max-of-directed definition apart from medpy's pooled one, so the check pins it.
    assert differs_from_pooled >= 5
    # A blob touching the image border: pixels on the border are surface pixels.
    full = np.ones((12, 12), bool)
    corner = np.zeros((12, 12), bool)
    corner[:6, :6] = True
    assert hd95(full, corner) == pytest.approx(_reference_hd95(full, corner), abs=1e-12)


@pytest.mark.slow
def test_hd95_equals_monai(recwarn):
    """Our scipy implementation against MONAI's own compute_hausdorff_distance(percentile=95) (slow: MONAI's import)."""
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(2)
    for _ in range(10):
        a, b = _blob(rng), _blob(rng)
        ours = hd95(a, b)
        theirs = monai_metrics.compute_hausdorff_distance(torch.from_numpy(a)[None, None].float(),
                                                          torch.from_numpy(b)[None, None].float(),
                                                          include_background=True, percentile=95).item()
        assert ours == pytest.approx(theirs, rel=1e-5)


# ------------------------------------------------------------------------------------------ probability maps


def _column_ramp() -> tuple[np.ndarray, np.ndarray]:
    """10 columns with probabilities 0.05, 0.15, …, 0.95; the target is the 5 columns above 0.5."""
    prob = np.tile(0.05 + 0.1 * np.arange(10), (6, 1))
    return prob, prob > 0.5


def test_single_threshold_binarises_strictly_above():
    prob, target = _column_ramp()
    assert probability_scores(prob, target, 0.5) == MaskScores(1.0, 1.0, 1.0, 1.0, 0.0)
    s = probability_scores(prob, target, 0.3)  # columns 3…9: 7 columns predicted, the 5 true ones among them
    assert (s.dice, s.iou, s.precision, s.recall) == pytest.approx((10 / 12, 5 / 7, 5 / 7, 1.0))
    exactly = np.full((4, 4), 0.5)
    assert probability_scores(exactly, np.ones((4, 4)), 0.5).dice == 0.0  # value == threshold is background
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        probability_scores(prob, target, 1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        probability_scores(prob * 2, target, 0.5)


def test_threshold_sweep_averages_over_0_1_to_0_9():
    assert SWEEP_THRESHOLDS == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    prob, target = _column_ramp()
    # At threshold i/10 the prediction is columns i…9 (10 - i of them); the target is columns 5…9.
    expected = {"dice": [], "iou": [], "precision": [], "recall": []}
    for i in range(1, 10):
        n_pred, inter = 10 - i, min(10 - i, 5)
        expected["dice"].append(2 * inter / (n_pred + 5))
        expected["iou"].append(inter / (n_pred + 5 - inter))
        expected["precision"].append(inter / n_pred)
        expected["recall"].append(inter / 5)
    s = probability_scores(prob, target)  # the default is the sweep
    for name, values in expected.items():
        assert getattr(s, name) == pytest.approx(np.mean(values), abs=1e-12)
    per_threshold = [hd95(prob > t, target) for t in SWEEP_THRESHOLDS]
    assert s.hd95 == pytest.approx(np.mean(per_threshold)) and per_threshold[4] == 0.0
    # A map whose maximum is 0.55: the prediction is empty from 0.6 on, so HD95 averages the defined thresholds only.
    low = np.clip(prob, 0, 0.55)
    s = probability_scores(low, target)
    assert s.hd95 == pytest.approx(np.mean([hd95(low > t, target) for t in SWEEP_THRESHOLDS[:5]]))
    assert s.dice == pytest.approx(np.mean([dice(low > t, target) for t in SWEEP_THRESHOLDS]))
    assert math.isnan(probability_scores(np.zeros((4, 4)), np.ones((4, 4))).hd95)  # undefined everywhere


def test_summary_is_nan_aware_and_counts_undefined_hd95():
    scores = [MaskScores(0.5, 0.25, 1.0, 0.5, 2.0), MaskScores(1.0, 1.0, 1.0, 1.0, math.nan),
              MaskScores(0.0, 0.0, 0.0, 0.0, 4.0)]
    s = summarize(scores)
    assert s["dice"].mean == pytest.approx(0.5) and s["dice"].std == pytest.approx(np.std([0.5, 1.0, 0.0]))
    assert (s["dice"].n, s["dice"].undefined) == (3, 0)
    assert (s["hd95"].mean, s["hd95"].std, s["hd95"].n, s["hd95"].undefined) == (3.0, 1.0, 2, 1)
    only_undefined = summarize([MaskScores(0.0, 0.0, 0.0, 0.0, math.nan)])["hd95"]
    assert only_undefined.n == 0 and math.isnan(only_undefined.mean) and only_undefined.as_dict()["mean"] is None
    with pytest.raises(ValueError, match="no images"):
        summarize([])


# ------------------------------------------------------------------------------------------ the command line


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
def folders(tmp_path):
    """Four pairs with known scores; predictions carry a ``_pred`` suffix and mixed storage forms."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    lesion = _square((32, 32), 8, 8, 10)
    _write(gt / "a.png", lesion * 255)  # 0/255
    _write(pred / "a_pred.png", lesion * 255)  # identical
    _write(gt / "b.png", lesion)  # a 0/1 label mask
    half = np.zeros((32, 32), np.uint16)
    half[8:18, 8:13] = 65535  # 16-bit, half of the lesion
    _write(pred / "b_pred.png", half)
    _write(gt / "c.png", np.zeros((32, 32), np.uint8))  # no lesion, none predicted
    _write(pred / "c_pred.png", np.zeros((32, 32), np.uint8))
    _write(gt / "d.png", lesion * 255)  # lesion missed: HD95 undefined
    _write(pred / "d_pred.png", np.zeros((32, 32), np.uint8))
    return pred, gt


def test_cli_clean_run_writes_the_csv_and_json(folders, tmp_path, capsys, caplog):
    pred, gt = folders
    out = tmp_path / "res" / "results.csv"
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--out", str(out)]) == 0
    assert not _errors(caplog)
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["name", "dice", "iou", "precision", "recall", "hd95"]
    by_name = {r["name"]: {k: float(v) for k, v in r.items() if k != "name"} for r in rows}
    assert list(by_name) == ["a", "b", "c", "d"]
    assert by_name["a"] == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    assert by_name["b"]["dice"] == pytest.approx(2 * 50 / 150) and by_name["b"]["recall"] == 0.5
    assert by_name["b"]["precision"] == 1.0 and by_name["b"]["hd95"] == pytest.approx(5.0)
    assert by_name["c"] == {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}
    assert by_name["d"]["dice"] == 0.0 and math.isnan(by_name["d"]["hd95"])
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["images"] == 4 and summary["mode"] == "binary"
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean([1.0, 2 / 3, 1.0, 0.0]))
    assert summary["metrics"]["hd95"] == {"mean": pytest.approx(5 / 3), "std": pytest.approx(np.std([0, 5, 0])),
                                          "n": 3, "undefined": 1}
    table = capsys.readouterr().out
    assert "4 images, binary predictions" in table
    assert any(line.startswith("hd95") and "1 undefined" in line for line in table.splitlines())
    assert not list(out.parent.glob(".*tmp"))  # no temporary files left


def test_cli_existing_output_needs_force(folders, tmp_path, caplog):
    pred, gt = folders
    out = tmp_path / "results.csv"
    out.write_text("keep me\n")
    argv = [str(pred), str(gt), "--pred-suffix", "_pred", "--out", str(out)]
    assert score_masks.main(argv) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0] and "exists" in errors[0] and "--force" in errors[0]
    assert out.read_text() == "keep me\n" and not out.with_suffix(".json").exists()
    assert score_masks.main([*argv, "--force"]) == 0
    assert out.read_text().startswith("name,dice,")


def test_cli_mismatched_names(folders, caplog):
    pred, gt = folders
    _write(pred / "extra_pred.png", np.zeros((32, 32), np.uint8))
    (gt / "c.png").unlink()
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred"]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "2 prediction(s) without ground truth (c_pred.png, extra_pred.png)" in errors[0]
    assert "0 ground-truth mask(s) without prediction" in errors[0] and "--allow-missing" in errors[0]
    caplog.clear()
    # Without the suffix nothing matches at all: the error says so and names files on both sides.
    assert score_masks.main([str(pred), str(gt), "--allow-missing"]) == 1
    assert "no prediction matches" in _errors(caplog)[0] and "a.png" in _errors(caplog)[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--allow-missing"]) == 0
    assert any("scoring only the matching pairs" in r.getMessage() for r in caplog.records)


def test_cli_non_binary_prediction_needs_threshold_or_sweep(folders, tmp_path, caplog):
    pred, gt = folders
    prob = np.zeros((32, 32), np.uint8)
    prob[8:18, 8:18] = 200  # the lesion at probability 0.78 …
    prob[0:4, 0:4] = 60  # … and a faint false positive at 0.24
    _write(pred / "a_pred.png", prob)
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred"]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "a_pred.png is not binary" in errors[0] and "--threshold" in errors[0] and "--sweep" in errors[0]
    out = tmp_path / "t.csv"
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--threshold", "0.5",
                             "--out", str(out)]) == 0
    rows = {r["name"]: r for r in csv.DictReader(out.open(newline=""))}
    assert float(rows["a"]["dice"]) == 1.0
    out = tmp_path / "s.csv"
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--sweep", "--out", str(out)]) == 0
    rows = {r["name"]: r for r in csv.DictReader(out.open(newline=""))}
    # 0.24 > t for t = 0.1, 0.2 (16 false positives); the lesion survives up to 0.7; nothing from 0.8 on.
    expected = np.mean([2 * 100 / 216] * 2 + [1.0] * 5 + [0.0] * 2)
    assert float(rows["a"]["dice"]) == pytest.approx(expected)
    assert json.loads(out.with_suffix(".json").read_text())["thresholds"] == pytest.approx(SWEEP_THRESHOLDS)
    caplog.clear()
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--threshold", "1.5"]) == 2
    assert len(_errors(caplog)) == 1 and "[0, 1]" in _errors(caplog)[0]


def test_cli_different_sizes_fail_unless_resized(folders, caplog):
    pred, gt = folders
    lesion = _square((32, 32), 8, 8, 10) * 255
    _write(pred / "a_pred.png", cv2.resize(lesion.astype(np.uint8), (16, 16), interpolation=cv2.INTER_NEAREST))
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred"]) == 1
    errors = _errors(caplog)
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "a_pred.png is 16×16" in errors[0] and "is 32×32" in errors[0] and "--resize" in errors[0]
    assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", "--resize"]) == 0


def test_threshold_and_sweep_score_0_1_label_predictions_as_masks(folders, tmp_path):
    """A 0/1 label PNG is a mask: --threshold and --sweep must score it as the 0/255 one, not as an empty map."""
    pred, gt = folders
    lesion = _square((32, 32), 8, 8, 10)
    _write(pred / "a_pred.png", lesion)  # the identical prediction, now stored as 0/1
    for extra in (["--threshold", "0.5"], ["--sweep"]):
        out = tmp_path / f"{extra[0][2:]}.csv"
        assert score_masks.main([str(pred), str(gt), "--pred-suffix", "_pred", *extra, "--out", str(out)]) == 0
        rows = {r["name"]: r for r in csv.DictReader(out.open(newline=""))}
        assert float(rows["a"]["dice"]) == 1.0 and float(rows["b"]["dice"]) == pytest.approx(2 * 50 / 150)
