"""Quality filter (MedDiff-FT): nearest-real cosine similarity inside a band, the band the real data imply, and
``python -m tools.filter_pairs`` writing a usable pairs folder of the kept pairs and a report (source untouched)."""

from __future__ import annotations

import json
import logging
import shutil

import cv2
import numpy as np
import pytest
from test_inference import base_out, cli, env, files  # noqa: F401  (fixtures)

from siamese.data.layout import read_prompt_jsonl
from siamese.meddiff.filtering import default_band, judge, nearest_similarity, real_leave_one_out
from tools import filter_pairs


def test_band_and_verdicts():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(20, 16)) + 3.0  # a cluster
    loo = real_leave_one_out(real)
    band = default_band(real)
    assert band.high == pytest.approx(loo.max()) and band.low == pytest.approx(np.quantile(loo, 0.01))
    synthetic = np.stack([real[3] * 2.0,  # the same direction as a real image: a near-copy (similarity 1)
                          -real.mean(0),  # the opposite direction: off-domain
                          real[5] + 0.5 * rng.normal(size=16)])  # near a real image, not a copy of it
    verdicts = judge(synthetic, real, default_band(real, low=0.3, high=0.999))
    assert [v.verdict for v in verdicts] == ["near-copy", "off-domain", "kept"]
    assert verdicts[0].nearest_real == 3 and verdicts[0].similarity == pytest.approx(1.0)
    sims, _ = nearest_similarity(synthetic, real)
    assert np.allclose(sims, [v.similarity for v in verdicts])
    assert default_band(real, low=0.1, high=0.2).low_source == "given"
    with pytest.raises(ValueError, match="band is empty"):
        default_band(real, low=0.9, high=0.5)
    with pytest.raises(ValueError, match="all zeros"):
        nearest_similarity(np.zeros((1, 16)), real)


def test_cli_keeps_a_usable_folder_and_reports_every_pair(env, base_out, tmp_path, caplog):  # noqa: F811
    src = tmp_path / "src"
    shutil.copytree(base_out, src)
    # One generated image replaced by a real training image: the filter must call it a near-copy.
    real_image = next(r.target for r in read_prompt_jsonl(env["root"] / "data" / "prompt.json"))
    copied = sorted((src / "images").glob("*.png"))[0]
    cv2.imwrite(str(copied), cv2.imread(str(real_image), cv2.IMREAD_COLOR))
    before = files(src)
    out = tmp_path / "kept"
    caplog.set_level(logging.INFO)
    argv = [str(src), "--real", str(env["root"] / "data"), "--out", str(out), "--features", "tiny", "--no-progress"]
    assert filter_pairs.main(argv) == 0
    assert files(src) == before  # nothing deleted or changed
    report = json.loads((out / "filter_report.json").read_text())
    verdicts = {p["name"]: p["verdict"] for p in report["pairs"]}
    assert len(verdicts) == 6 and verdicts[copied.stem] == "near-copy"
    kept = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in kept) == sorted(n for n, v in verdicts.items() if v == "kept")
    for record in kept:
        assert (out / record["image"]).read_bytes() == (src / record["image"]).read_bytes()
        assert (out / record["mask"]).is_file() and report["band"]["low"] <= record["filter_similarity"]
    assert report["counts"]["kept"] == len(kept) and "kept" in caplog.text
    # An empty result, an existing output and missing weights get one line each and write nothing.
    caplog.clear()
    empty = tmp_path / "empty"
    assert filter_pairs.main(argv[:4] + [str(empty)] + argv[5:] + ["--low", "-1", "--high", "-0.99"]) == 1
    assert filter_pairs.main(argv) == 1
    assert filter_pairs.main(argv[:4] + [str(tmp_path / "w"), "--features", "timm:vit_small_patch14_dinov2"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 and all("\n" not in e for e in errors)
    assert "keeps no pair" in errors[0] and "exists" in errors[1] and "weights" in errors[2]
    assert not empty.exists() and not (tmp_path / "empty.partial").exists()


def test_first_stage_tower_from_a_framework_checkpoint(tmp_path):
    """``first_stage``: the VAE encoder of the shipped base as a feature tower (deterministic, image-dependent); a
    file without this framework's config is refused in one line."""
    from pathlib import Path

    from ldm.checkpoint import save_state_dict

    import numpy as np
    import pytest
    import torch

    from siamese.data.synthetic import synthetic_pair
    from siamese.evaluation.towers import load_feature_extractor

    shipped = Path(__file__).resolve().parents[1] / "data" / "pretrained" / "base_tiny.safetensors"
    tower = load_feature_extractor("first_stage", shipped)
    assert tower.input_size == (64, 64)
    images = [synthetic_pair(i, 64)[0] for i in range(3)]
    feats = tower.features(images + images[:1], progress=False)
    assert feats.shape == (4, tower.dim) and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats[0], feats[3])
    assert not np.allclose(feats[0], feats[1])
    bare = tmp_path / "bare.safetensors"
    save_state_dict({"x": torch.zeros(1)}, bare)
    with pytest.raises(ValueError, match="carries no config"):
        load_feature_extractor("first_stage", bare)
    with pytest.raises(ValueError, match="needs weights"):
        load_feature_extractor("first_stage")
