"""Image quality measures: FID/KID against independent numpy/scipy references, extractor specs from local weight
files, intra-mask diversity, memorisation (+ its PNG) and the readers."""

from __future__ import annotations

import json
import logging

import ldm  # noqa: F401  (torchvision shim first)
from ldm.checkpoint import save_state_dict

import cv2
import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.spatial.distance import pdist

from siamese.data.synthetic import synthetic_pair
from siamese.evaluation import features, towers
from siamese.evaluation import quality as q

# ------------------------------------------------------------------------------------------------ references


def exact_samples(rng: np.random.Generator, mean: np.ndarray, cov: np.ndarray, n: int) -> np.ndarray:
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = rng.standard_normal((n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance → identity
    return z @ np.linalg.cholesky(cov).T + mean


def reference_fid(mu_a, cov_a, mu_b, cov_b) -> float:
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def reference_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² by explicit sums over pairs (Bińkowski et al. 2018, eq. 4), k(x, y) = (xᵀy/d + 1)³."""
    m, d = x.shape

    def k(u, v):
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# ------------------------------------------------------------------------------------------------ FID


def test_fid_matches_closed_form_and_scipy_reference():
    rng = np.random.default_rng(0)
    d = 6
    mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
    cov_a, cov_b = random_spd(rng, d), random_spd(rng, d)
    a, b = exact_samples(rng, mu_a, cov_a, 400), exact_samples(rng, mu_b, cov_b, 300)
    expected = reference_fid(mu_a, cov_a, mu_b, cov_b)
    assert q.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert q.frechet_distance(b, a) == pytest.approx(expected, rel=1e-9, abs=1e-9)  # symmetric
    # torchmetrics' own formula on the same Gaussians agrees too.
    from torchmetrics.image.fid import _compute_fid

    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu_a, cov_a, mu_b, cov_b)))
    assert float(tm) == pytest.approx(expected, rel=1e-7)

    # Diagonal covariances: Tr(Σa + Σb − 2(ΣaΣb)^½) = Σ (σa − σb)², no matrix square root needed.
    var_a, var_b = rng.uniform(0.2, 3.0, d), rng.uniform(0.2, 3.0, d)
    a = exact_samples(rng, mu_a, np.diag(var_a), 200)
    b = exact_samples(rng, mu_b, np.diag(var_b), 200)
    closed = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert q.frechet_distance(a, b) == pytest.approx(closed, rel=1e-9)


def test_fid_identical_and_shifted_features():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((100, 5))
    assert q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0])
    assert q.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)


def test_fid_with_fewer_samples_than_dimensions_warns(caplog):
    rng = np.random.default_rng(2)
    with caplog.at_level(logging.WARNING, logger=q.__name__):
        value = q.frechet_distance(rng.standard_normal((5, 8)), rng.standard_normal((6, 8)))
    assert np.isfinite(value) and value > 0
    assert "singular" in caplog.text and "5 samples for 8-dimensional" in caplog.text


@pytest.mark.parametrize("fn", [q.frechet_distance, q.kernel_inception_distance])
def test_fid_kid_refuse_bad_features(fn):
    good = np.zeros((4, 3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        fn(np.zeros((1, 3)), good)
    with pytest.raises(ValueError, match="feats_b: needs at least 2 samples"):
        fn(good, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="dimensions differ"):
        fn(good, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        fn(np.zeros(4), good)
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, good)


# ------------------------------------------------------------------------------------------------ KID


def test_kid_matches_explicit_pair_sums_and_torchmetrics():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((25, 6)), rng.standard_normal((25, 6)) + 0.3
    # One subset of the full size is a permutation of each set; MMD² does not depend on the order.
    kid = q.kernel_inception_distance(x, y, subsets=1, subset_size=25)
    assert kid.mean == pytest.approx(reference_mmd2(x, y), rel=1e-10)
    assert kid.std == 0.0 and kid.subset_size == 25
    from torchmetrics.image.kid import poly_mmd

    assert float(poly_mmd(torch.from_numpy(x), torch.from_numpy(y))) == pytest.approx(kid.mean, rel=1e-8)


def test_kid_is_unbiased_and_positive_for_shifted_distributions():
    rng = np.random.default_rng(4)
    same, shifted = [], []
    for _ in range(300):
        x, y, z = rng.standard_normal((20, 4)), rng.standard_normal((20, 4)), rng.standard_normal((20, 4)) + 0.5
        same.append(q.kernel_inception_distance(x, y, subsets=1, subset_size=20).mean)
        shifted.append(q.kernel_inception_distance(x, z, subsets=1, subset_size=20).mean)
    same, shifted = np.array(same), np.array(shifted)
    sem = same.std() / np.sqrt(len(same))
    assert abs(same.mean()) < 4 * sem  # zero in expectation: unbiased
    assert shifted.mean() > 10 * sem and shifted.mean() > 5 * abs(same.mean())
    # Over many subsets of two large samples of one distribution: near 0, and seeded.
    a, b = rng.standard_normal((400, 4)), rng.standard_normal((400, 4))
    kid = q.kernel_inception_distance(a, b, subsets=50, subset_size=100, seed=7)
    assert abs(kid.mean) < 0.05 and kid.std > 0
    assert q.kernel_inception_distance(a, b, subsets=50, subset_size=100, seed=7) == kid


def test_kid_caps_the_subset_size(caplog):
    rng = np.random.default_rng(5)
    with caplog.at_level(logging.WARNING, logger=q.__name__):
        kid = q.kernel_inception_distance(rng.standard_normal((10, 3)), rng.standard_normal((12, 3)), subsets=3,
                                          subset_size=1000)
    assert kid.subset_size == 10 and "using subsets of 10" in caplog.text
    with pytest.raises(ValueError, match="subsets must be"):
        q.kernel_inception_distance(np.zeros((4, 2)), np.zeros((4, 2)), subsets=0)


# ------------------------------------------------------------------------------------------------ extractors


def lesion_images(n: int, size: int = 64, seed: int = 11) -> list[np.ndarray]:
    return [synthetic_pair(i, size, seed=seed)[0] for i in range(n)]


def test_tiny_extractor_is_seeded_and_batch_independent(tmp_path):
    images = lesion_images(5)
    extractor = towers.load_feature_extractor("tiny", seed=0)
    feats = extractor.features(images, batch_size=2, progress=False)
    assert feats.shape == (5, 64) and feats.dtype == np.float64 and extractor.dim == 64
    np.testing.assert_allclose(extractor.features(images, batch_size=5, progress=False), feats, rtol=1e-5, atol=1e-6)
    again = towers.load_feature_extractor("tiny", seed=0).features(images, batch_size=2, progress=False)
    np.testing.assert_array_equal(again, feats)
    assert not np.allclose(towers.load_feature_extractor("tiny", seed=1).features(images, progress=False), feats)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR))
    np.testing.assert_allclose(extractor.features([path], progress=False)[0], feats[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes no weights"):
        towers.load_feature_extractor("tiny", tmp_path / "w.pt")
    with pytest.raises(ValueError, match="uint8 RGB"):
        extractor.features([np.zeros((8, 8), np.uint8)], progress=False)
    with pytest.raises(ValueError, match="no images"):
        extractor.features([], progress=False)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    save_state_dict(model.state_dict(), path)
    return model, path


def test_torchvision_and_timm_towers_load_a_local_resnet18(resnet18_file):
    model, path = resnet18_file
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    tv = towers.load_feature_extractor("torchvision:resnet18", path)
    feats = tv.features(images, batch_size=2, progress=False)
    assert feats.shape == (3, 512)
    # Penultimate layer of the very weights in the file (224 px: no resize, ImageNet normalisation).
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2)).float() / 255
    mean, std = torch.tensor(towers._IMAGENET_MEAN), torch.tensor(towers._IMAGENET_STD)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    model.fc = torch.nn.Identity()
    with torch.no_grad():
        np.testing.assert_allclose(feats, model(x).double().numpy(), rtol=1e-4, atol=1e-5)
    # timm's resnet18 has torchvision's key layout: same file, same features.
    tm = towers.load_feature_extractor("timm:resnet18", path)
    np.testing.assert_allclose(tm.features(images, progress=False), feats, rtol=1e-4, atol=1e-5)
    # A file without the classifier loads too (the head is cut off either way).
    headless = path.with_name("resnet18_headless.safetensors")
    save_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, headless)
    np.testing.assert_allclose(towers.load_feature_extractor("torchvision:resnet18", headless).features(
        images[:1], progress=False), feats[:1], rtol=1e-4, atol=1e-5)


def test_tower_specs_refuse_what_does_not_fit(resnet18_file, tmp_path):
    _, path = resnet18_file
    with pytest.raises(ValueError, match=r"torchvision:resnet34: the weights in .* do not fit.*missing"):
        towers.load_feature_extractor("torchvision:resnet34", path)
    with pytest.raises(ValueError, match="do not fit"):
        towers.load_feature_extractor("timm:resnet34", path)
    with pytest.raises(ValueError, match="torchvision has no classification model 'nonet'"):
        towers.load_feature_extractor("torchvision:nonet", path)
    with pytest.raises(ValueError, match=r"timm:nonet: Unknown model"):
        towers.load_feature_extractor("timm:nonet", path)
    with pytest.raises(ValueError, match="open_clip has no built-in model"):
        towers.load_feature_extractor("open_clip:hf-hub:someone/model", path)
    with pytest.raises(ValueError, match="unknown feature extractor 'vgg'"):
        towers.load_feature_extractor("vgg", path)
    with pytest.raises(ValueError, match="needs weights=PATH"):
        towers.load_feature_extractor("torchvision:resnet18")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        towers.load_feature_extractor("torchvision:resnet18", tmp_path / "absent.pth")


def test_open_clip_tower_from_a_visual_state_dict(tmp_path):
    import open_clip

    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    path = tmp_path / "clip.safetensors"
    save_state_dict({k: v for k, v in model.state_dict().items() if k.startswith("visual.")}, path)
    extractor = towers.load_feature_extractor("open_clip:ViT-S-32", path)
    assert extractor.input_size == (224, 224)
    images = [np.random.default_rng(i).integers(0, 256, (224, 224, 3), dtype=np.uint8) for i in range(2)]
    feats = extractor.features(images, progress=False)
    assert feats.shape == (2, 384)
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2)).float() / 255
    x = (x - torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        np.testing.assert_allclose(feats, model.encode_image(x).double().numpy(), rtol=1e-4, atol=1e-5)
    siglip = towers.load_feature_extractor("open_clip:ViT-S-32", path, mean_std=((0.5,) * 3, (0.5,) * 3))
    assert siglip.mean == (0.5, 0.5, 0.5) and siglip.std == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="do not fit"):
        towers.load_feature_extractor("open_clip:ViT-S-16", path)


def test_inception_needs_its_local_file_and_never_downloads(tmp_path, monkeypatch):
    import torch.hub
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    for weights in (None, tmp_path / "nothere.pth"):
        with pytest.raises(FileNotFoundError) as info:
            towers.load_feature_extractor("inception", weights)
        message = str(info.value)
        assert "\n" not in message and "pt_inception-2015-12-05" in message
        assert towers.INCEPTION_WEIGHTS_FILE in message and towers.INCEPTION_URL in message
    # The architecture with a weight file written here (random weights): 2048-d pool features.
    path = tmp_path / "inception.safetensors"
    save_state_dict(towers._random_inception().state_dict(), path)
    extractor = towers.load_feature_extractor("inception", path)
    feats = extractor.features(lesion_images(2), progress=False)
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()


# ------------------------------------------------------------------------------------------------ diversity


def test_intra_mask_diversity():
    rng = np.random.default_rng(8)
    feats = rng.standard_normal((7, 16))
    feats[1] = feats[0] * 3.0  # same direction: cosine distance 0
    pixels = rng.uniform(0, 1, (7, 48))
    groups = ["a", "a", "b", "b", "b", "c", "d"]
    result = q.intra_mask_diversity(feats, groups, pixels)
    assert [m.source for m in result.per_mask] == ["a", "b"] and result.skipped_single == 2
    a, b = result.per_mask
    assert a.n == 2 and a.feature_cosine == pytest.approx(0.0, abs=1e-12)
    assert b.feature_cosine == pytest.approx(pdist(feats[2:5], "cosine").mean(), rel=1e-10)
    assert b.pixel_rmse == pytest.approx((pdist(pixels[2:5]) / np.sqrt(48)).mean(), rel=1e-8)
    assert result.mean_feature_cosine == pytest.approx((a.feature_cosine + b.feature_cosine) / 2)
    assert result.mean_pixel_rmse == pytest.approx((a.pixel_rmse + b.pixel_rmse) / 2)
    no_pix = q.intra_mask_diversity(feats, groups)
    assert no_pix.mean_pixel_rmse is None and no_pix.per_mask[1].pixel_rmse is None
    single = q.intra_mask_diversity(feats[:2], ["x", "y"])
    assert single.per_mask == [] and np.isnan(single.mean_feature_cosine) and single.skipped_single == 2
    with pytest.raises(ValueError, match="7 feature rows but 3 group labels"):
        q.intra_mask_diversity(feats, groups[:3])


# ------------------------------------------------------------------------------------------------ memorisation


def test_memorisation_flags_an_exact_copy_first_and_draws_the_pairs(tmp_path):
    training = lesion_images(8, seed=21)
    fresh = lesion_images(5, seed=99)
    synthetic = fresh[:2] + [training[5].copy()] + fresh[2:]
    extractor = towers.load_feature_extractor("tiny")
    report = q.memorisation(synthetic, training, synthetic_features=extractor.features(synthetic, progress=False),
                            training_features=extractor.features(training, progress=False))
    first = report.matches[0]
    assert first.synthetic_index == 2 and first.feature_index == 5 and first.pixel_index == 5
    assert first.feature_flag and first.pixel_flag and first.pixel_rmse == pytest.approx(0.0, abs=1e-6)
    assert not any(m.flagged for m in report.matches[1:])
    assert all(m.pixel_rmse > q.DEFAULT_PIXEL_THRESHOLD for m in report.matches[1:])
    assert [m.score for m in report.matches] == sorted(m.score for m in report.matches)
    summary = report.summary()
    assert summary["flagged_any"] == summary["flagged_feature"] == summary["flagged_pixel"] == 1
    assert summary["n_synthetic"] == 6 and summary["n_training"] == 8
    assert summary["pixel_rmse_percentiles"]["p0"] == pytest.approx(0.0, abs=1e-6)
    json.dumps(summary)

    out = report.write_nearest_pairs_png(tmp_path / "nearest.png", worst_k=3, cell=96)
    png = cv2.imread(str(out))
    assert png.shape == (3 * (96 + 34), 2 * 96, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nearest.png"]  # no temporary file left
    # Row 0 is the copy: both halves identical.
    np.testing.assert_array_equal(png[:96, :96], png[:96, 96:])

    # Distinct images only: nothing flagged.
    clean = q.memorisation(fresh, training, synthetic_features=extractor.features(fresh, progress=False),
                           training_features=extractor.features(training, progress=False))
    assert clean.summary()["flagged_any"] == 0
    with pytest.raises(ValueError, match=r"synthetic features must be \(5, d\)"):
        q.memorisation(fresh, training, synthetic_features=np.zeros((4, 64)), training_features=np.zeros((8, 64)))
    with pytest.raises(ValueError, match="threshold must be positive"):
        q.memorisation(fresh, training, synthetic_features=np.zeros((5, 64)), training_features=np.zeros((8, 64)),
                       pixel_threshold=0)


# ------------------------------------------------------------------------------------------------ readers


def write_rgb(path, rgb):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def test_readers_and_equal_count(tmp_path):
    run = tmp_path / "run"
    lines = []
    for source in ("m2", "m1"):
        for k in (1, 0):
            name = f"{source}_k{k}"
            write_rgb(run / "images" / f"{name}.png", synthetic_pair(k, 32)[0])
            lines.append(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                     "source": f"/data/{source}.png", "seed": k, "k": k}))
    (run / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    images = features.read_run_images(run)
    assert [r.name for r in images] == ["m1_k0", "m2_k0", "m1_k1", "m2_k1"]
    name, source, path = images[0]
    assert source == "/data/m1.png" and path == run / "images" / "m1_k0.png"
    with pytest.raises(FileNotFoundError, match="no manifest.jsonl"):
        features.read_run_images(tmp_path)

    data = tmp_path / "data"
    for i in range(3):
        write_rgb(data / "target" / f"{i}.png", synthetic_pair(i, 32)[0])
        write_rgb(data / "source" / f"{i}.png", np.zeros((32, 32, 3), np.uint8))
    records = [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": "p"} for i in (2, 0, 1)]
    (data / "prompt.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert [p.name for p in features.read_dataset_images(data)] == ["2.png", "0.png", "1.png"]
    assert features.read_dataset_images(data / "prompt.json") == features.read_dataset_images(data)
    assert [p.name for p in features.read_dataset_images(data / "target")] == ["0.png", "1.png", "2.png"]
    with pytest.raises(ValueError, match="no image files"):
        features.read_dataset_images(_empty(tmp_path))

    real, synth = features.equal_count(features.read_dataset_images(data), images)
    assert len(real) == len(synth) == 3 and [s.name for s in synth] == ["m1_k0", "m2_k0", "m1_k1"]
    with pytest.raises(ValueError, match="only 4 synthetic images for 5 real ones"):
        features.equal_count(list(range(5)), images)
    with pytest.raises(ValueError, match="only 3 real images for a count of 4"):
        features.equal_count(list(range(3)), images, count=4)


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder
