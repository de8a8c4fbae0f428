"""Metrics that mean what they say (issue 21): fidelity of eroded pairs against the mask the image was conditioned
on, memorisation thresholds calibrated per tower on train *and* test images, a near-copy bound that one duplicate
does not break, and the filter judging a background-preserving pair against its own background."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ldm  # noqa: F401  (the torchvision shim first)

import cv2
import numpy as np
import pytest

from siamese.data.images import write_png
from siamese.data.masks import erode_mask, mask_to_png
from siamese.data.pairs import MaskSource, PairWriter, SampledPair, WorkItem
from siamese.data.provenance import digest_file
from siamese.data.synthetic import synthetic_pair
from siamese.evaluation import quality
from siamese.evaluation.calibration import cosine_leave_one_out
from siamese.evaluation.fidelity import score_pairs
from siamese.evaluation.towers import load_feature_extractor
from siamese.meddiff.erosion import erode_folder
from siamese.meddiff.filtering import default_band, judge
from tools import filter_pairs

SHIPPED = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "base_tiny.safetensors"


def pairs_folder(root: Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """A pairs folder (images/, masks/, manifest.jsonl) of the generated lesion domain: images whose lesions follow
    their masks, so the colour rule's fidelity is high against the true masks."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    lines = []
    for i in range(n):
        rgb, mask01 = synthetic_pair(seed * 1000 + i, size)
        name = f"p{i:02d}_k0"
        write_png(root / "images" / f"{name}.png", rgb)
        write_png(root / "masks" / f"{name}.png", mask_to_png(mask01))
        lines.append(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "source": f"masks/{name}.png", "k": 0, "seed": i}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ------------------------------------------------------------------------------------------------ eroded fidelity


def test_eroded_fidelity_is_scored_against_the_conditioning_mask(tmp_path):
    src = pairs_folder(tmp_path / "src", 6)
    eroded = tmp_path / "eroded"
    erode_folder(src, eroded, 4, "ellipse")
    full = {s.name: s for s in score_pairs(src)}
    after = {s.name: s for s in score_pairs(eroded)}
    for name, score in after.items():
        # The same images against the same conditioning masks: the same fidelity; the eroded label is beside it.
        assert score.dice == pytest.approx(full[name].dice) and full[name].label_dice is None
        assert score.label_dice is not None
    assert np.mean([s.label_dice for s in after.values()]) < np.mean([s.dice for s in after.values()]) - 0.02
    # An eroded line that does not say what it was conditioned on is refused, not scored against its label.
    lines = [json.loads(x) for x in (eroded / "manifest.jsonl").read_text().splitlines()]
    for line in lines:
        del line["conditioning_mask"]
    (eroded / "manifest.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match="eroded by 4 px and no conditioning_mask"):
        score_pairs(eroded)


def test_sampling_with_erode_keeps_the_conditioning_mask(tmp_path):
    rgb, mask01 = synthetic_pair(3, 64)
    source = tmp_path / "m.png"
    write_png(source, mask_to_png(mask01))
    writer = PairWriter(tmp_path / "out", {"erode": 3, "erode_kernel": "ellipse"})
    item = WorkItem(MaskSource("m", source, "p"), 0, 0)
    record = writer.write(SampledPair(item, rgb, mask01, mask01))
    conditioning = cv2.imread(str(tmp_path / "out" / record["conditioning_mask"]), cv2.IMREAD_GRAYSCALE) // 255
    label = cv2.imread(str(tmp_path / "out" / record["mask"]), cv2.IMREAD_GRAYSCALE) // 255
    assert np.array_equal(conditioning, mask01) and np.array_equal(label, erode_mask(mask01, 3, "ellipse"))
    assert writer.is_complete("m_k0")
    (tmp_path / "out" / record["conditioning_mask"]).unlink()
    assert not writer.is_complete("m_k0")  # a pair whose conditioning mask is missing is made again


# ------------------------------------------------------------------------------------------------ memorisation


def test_first_stage_memorisation_is_calibrated_and_searches_the_test_images():
    """With the framework's own VAE features, the fixed threshold flags most distinct images; the calibrated one
    flags a planted copy of a training image and one of a test image (counted apart), and no distinct image."""
    tower = load_feature_extractor("first_stage", SHIPPED)
    train = [synthetic_pair(i, 64)[0] for i in range(40)]
    test = [synthetic_pair(100 + i, 64)[0] for i in range(10)]
    distinct = [synthetic_pair(500 + i, 64)[0] for i in range(12)]
    ok, jpeg = cv2.imencode(".jpg", train[7], [cv2.IMWRITE_JPEG_QUALITY, 70])
    train_copy = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)
    test_copy = cv2.resize(test[3], (96, 96), interpolation=cv2.INTER_CUBIC)
    synthetic = distinct + [train_copy, test_copy]
    real = train + test
    feats = dict(synthetic_features=tower.features(synthetic, progress=False),
                 training_features=tower.features(real, progress=False))
    fixed = quality.memorisation(synthetic, real, **feats, feature_threshold=quality.DEFAULT_FEATURE_THRESHOLD,
                                 pixel_threshold=quality.DEFAULT_PIXEL_THRESHOLD)
    assert sum(m.flagged for m in fixed.matches if m.synthetic_index < 12) >= 3  # the defect: distinct images flagged
    report = quality.memorisation(synthetic, real, **feats, training_splits=["train"] * 40 + ["test"] * 10)
    flagged = {m.synthetic_index: m for m in report.matches if m.flagged}
    assert set(flagged) == {12, 13}
    assert flagged[12].feature_index == 7 and not flagged[12].flagged_test
    assert flagged[13].feature_index == 43 and flagged[13].flagged_test
    summary = report.summary()
    assert summary["flagged_test"] == 1 and "distinct real images" in summary["thresholds_from"]["feature"]
    assert report.feature_threshold != fixed.feature_threshold


def test_a_duplicate_among_the_real_images_keeps_a_finite_near_copy_bound(caplog):
    tower = load_feature_extractor("tiny")
    images = [synthetic_pair(i, 64)[0] for i in range(12)]
    images.append(images[4].copy())  # the same picture saved twice
    feats = tower.features(images, progress=False)
    bare = default_band(feats)  # without the images the duplicate is invisible: the bound becomes "identical"
    assert bare.high == pytest.approx(1.0)
    with caplog.at_level(logging.WARNING):
        band = default_band(feats, images=images)
    assert band.high < 0.999 and len(band.duplicates) == 2 and "near-duplicate" in caplog.text
    loo = cosine_leave_one_out(feats, images)
    assert sorted(set(range(13)) - set(loo.kept.tolist())) == [4, 12]
    # The memorisation screen gets the same robustness: a positive pixel threshold despite the duplicate.
    report = quality.memorisation(images[:3], images, synthetic_features=feats[:3], training_features=feats)
    assert report.pixel_threshold > 1e-6 and report.feature_threshold > 1e-6
    with pytest.raises(ValueError, match="every one of the 2 real images has a near-duplicate"):
        cosine_leave_one_out(feats[[4, 12]], [images[4], images[12]])


# ------------------------------------------------------------------------------------------------ own background


def test_filter_judges_a_background_pair_against_its_own_background(tmp_path):
    """A pair generated on a real background shares everything outside its region with it: judged against the whole
    set it is a near-copy of that background; judged against its own background inside the region, a pair with a
    new lesion there is kept and one that reproduced the background is a near-copy."""
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    reals = []
    for i in range(16):
        rgb = synthetic_pair(200 + i, 64)[0]
        write_png(real_dir / f"r{i:02d}.png", rgb)
        reals.append(rgb)
    out = tmp_path / "synth"
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    mask01 = np.zeros((64, 64), np.uint8)
    cv2.circle(mask01, (30, 34), 13, 1, -1)
    lesion_rgb = synthetic_pair(901, 64)[0]
    lines = []
    for name, background, inside in (("new_k0", 3, lesion_rgb), ("same_k0", 5, reals[5])):
        image = reals[background].copy()
        image[mask01 == 1] = inside[mask01 == 1]  # generated inside the mask, the background kept outside
        write_png(out / "images" / f"{name}.png", image)
        write_png(out / "masks" / f"{name}.png", mask_to_png(mask01))
        bg = real_dir / f"r{background:02d}.png"
        lines.append(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                 "source": f"masks/{name}.png", "background": f"../real/{bg.name}",
                                 "background_digest": digest_file(bg), "region": "area:0.5", "latent_factor": 8}))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")

    tower = load_feature_extractor("tiny")
    real_f = tower.features(reals, progress=False)
    synth_f = tower.features([out / "images" / "new_k0.png", out / "images" / "same_k0.png"], progress=False)
    band = default_band(real_f, images=reals)
    assert [v.verdict for v in judge(synth_f, real_f, band)] == ["near-copy", "near-copy"]  # the old judgement

    target = tmp_path / "kept"
    assert filter_pairs.main([str(out), "--real", str(real_dir), "--out", str(target), "--features", "tiny",
                              "--no-progress", "--low", "-1"]) == 0
    report = json.loads((target / "filter_report.json").read_text())
    verdicts = {p["name"]: p for p in report["pairs"]}
    assert verdicts["new_k0"]["verdict"] == "kept" and verdicts["same_k0"]["verdict"] == "near-copy"
    assert not verdicts["new_k0"]["nearest_real"].endswith("r03.png")  # its own background is not its nearest
    assert verdicts["same_k0"]["background_similarity"] > verdicts["same_k0"]["background_bound"]
    assert verdicts["new_k0"]["background_similarity"] < verdicts["new_k0"]["background_bound"]


def test_background_folders_from_before_the_trajectory_start_are_not_resumed(tmp_path):
    """Pairs made on backgrounds before the outside started on the background's trajectory differ from today's:
    resuming such a folder is refused instead of mixing the two."""
    rgb, mask01 = synthetic_pair(4, 64)
    source = tmp_path / "m.png"
    write_png(source, mask_to_png(mask01))
    item = WorkItem(MaskSource("m", source, "p"), 0, 0)
    PairWriter(tmp_path / "out", {"backgrounds": "bg"}).write(SampledPair(item, rgb, mask01, mask01))
    new = PairWriter(tmp_path / "out", {"backgrounds": "bg", "background_start": "first-step"})
    with pytest.raises(ValueError, match="background_start"):
        new.check_compatible([item])
