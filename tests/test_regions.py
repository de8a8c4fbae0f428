"""The latent-region choice of background-preserving sampling (``ldm.regions``, issue 21): each mode on a hand-made
mask, the image region consistent with the latent one, bad specs refused in one line, and a pairs manifest recording
the canonical spec and the latent factor (``tutorial_inference.py --background DIR --region SPEC``)."""

from __future__ import annotations

import logging

from ldm.regions import DEFAULT_REGION, dilate_mask, image_region, latent_region, parse_region

import cv2
import numpy as np
import pytest
import torch
from _inference_env import cli, env, error_lines, manifest_lines, run_cli  # noqa: F401  (fixtures)

from tools.inference import build_parser, main

FACTOR = 4


def hand_mask() -> np.ndarray:
    """16×16 at factor 4 (a 4×4 latent); the cells (row, col) and how many of their 16 pixels are in the mask."""
    mask = np.zeros((16, 16), np.uint8)
    mask[1, 1] = 1  # (0, 0): 1 pixel
    mask[0:2, 8:12] = 1  # (0, 2): 8 pixels, half
    mask[5:7, 9:12] = 1  # (1, 2): 6 pixels
    mask[8:12, 0:4] = 1  # (2, 0): all 16
    mask[12:15, 12:16] = 1  # (3, 3): 12 pixels
    return mask


EXPECTED = {
    "max-pool": {(0, 0), (0, 2), (1, 2), (2, 0), (3, 3)},
    "area:0.5": {(0, 2), (2, 0), (3, 3)},
    "area:0.375": {(0, 2), (1, 2), (2, 0), (3, 3)},  # ⌈0.375 · 16⌉ = 6 pixels
    "area:0.75": {(2, 0), (3, 3)},
    "area:0.8": {(2, 0)},  # ⌈12.8⌉ = 13 > 12
    "area:1.0": {(2, 0)},
    "dilate:0": {(0, 2), (2, 0), (3, 3)},
    # The disk of radius 1 is the 4-neighbour cross: (1, 2) grows to 6 + 3 + 3 + 2 = 14 pixels, (0, 0) to 5 (< 8).
    "dilate:1": {(0, 2), (1, 2), (2, 0), (3, 3)},
}


def cells(region: torch.Tensor) -> set[tuple[int, int]]:
    return {(int(r), int(c)) for r, c in torch.nonzero(region[0, 0]).tolist()}


@pytest.mark.parametrize("spec", sorted(EXPECTED))
def test_each_mode_on_a_hand_made_mask(spec: str) -> None:
    mask = torch.from_numpy(hand_mask()).float()[None, None]
    region = latent_region(mask, (4, 4), spec)
    assert region.dtype == torch.bool and region.shape == (1, 1, 4, 4)
    assert cells(region) == EXPECTED[spec]
    image = image_region(hand_mask(), FACTOR, spec)
    assert image.dtype == np.uint8 and image.shape == (16, 16)
    np.testing.assert_array_equal(image, np.kron(region[0, 0].numpy(), np.ones((FACTOR, FACTOR))).astype(np.uint8))


def test_max_pool_is_the_old_rule_and_covers_the_mask() -> None:
    g = torch.Generator().manual_seed(0)
    masks = (torch.rand(3, 1, 64, 64, generator=g) > 0.97).float()
    old = torch.nn.functional.adaptive_max_pool2d(masks, (8, 8)) > 0.5  # background_condition before the choice
    assert torch.equal(latent_region(masks, (8, 8)), old) and torch.equal(latent_region(masks, (8, 8), "max-pool"), old)
    mask01 = masks[0, 0].numpy().astype(np.uint8)
    assert (image_region(mask01, 8) >= mask01).all()  # max-pool: every mask pixel is generated
    assert (image_region(mask01, 8, "area:1") <= mask01).all()  # area:1: only whole cells inside the mask


@pytest.mark.parametrize("pixels", [1, 2, 3])
def test_dilation_is_the_euclidean_disk(pixels: int) -> None:
    g = torch.Generator().manual_seed(pixels)
    inside = torch.rand(1, 1, 12, 12, generator=g) > 0.93
    points = torch.nonzero(inside[0, 0]).float()
    grid = torch.stack(torch.meshgrid(torch.arange(12.0), torch.arange(12.0), indexing="ij"), -1).view(-1, 1, 2)
    brute = ((grid - points[None]).pow(2).sum(-1) <= pixels**2).any(1).view(12, 12)
    assert torch.equal(dilate_mask(inside, pixels)[0, 0], brute)
    one = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    one[0, 0, 5, 5] = True  # dilate:2 gives 13 pixels, 11 of them in cell (1, 1): generated; dilate:1 gives 5: not
    assert cells(latent_region(one.float(), (4, 4), "dilate:2")) == {(1, 1)}
    assert cells(latent_region(one.float(), (4, 4), "dilate:1")) == set()


def test_canonical_forms_and_bad_specs() -> None:
    assert DEFAULT_REGION == "max-pool"
    for text, canonical in [("max-pool", "max-pool"), ("area:.5", "area:0.5"), ("area:1", "area:1.0"),
                            ("area:0.25", "area:0.25"), ("dilate:03", "dilate:3"), ("dilate:0", "dilate:0"),
                            (" area:0.5 ", "area:0.5")]:
        assert str(parse_region(text)) == canonical
        assert parse_region(str(parse_region(text))) == parse_region(text)
    for bad in ["", "maxpool", "max-pool:1", "area", "area:", "area:0", "area:1.5", "area:-0.5", "area:x", "area:nan",
                "dilate", "dilate:", "dilate:-1", "dilate:1.5", "dilate:²", "erode:2"]:
        with pytest.raises(ValueError, match="expected max-pool, area:F") as info:
            parse_region(bad)
        assert repr(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="not an exact multiple of the latent size 5×5"):
        latent_region(torch.zeros(1, 1, 16, 16), (5, 5), "area:0.5")
    with pytest.raises(ValueError, match="not a multiple of the latent factor 8"):
        image_region(np.zeros((12, 16), np.uint8), 8)


def test_help_names_the_region_and_eta_rules() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--region SPEC" in text and "with --background only" in text and "dilate:N" in text
    assert "DDIM only; dpmpp_2m/unipc refuse η > 0" in text


def test_sampling_run_records_the_region(env, tmp_path, caplog):  # noqa: F811
    backgrounds = tmp_path / "backgrounds"
    backgrounds.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(backgrounds / f"bg_{i}.png"), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    out = tmp_path / "out"
    argv = cli(env, out, "--batch-size", "3", "--limit", "3", "--background", str(backgrounds))
    assert run_cli([*argv, "--region", "area:.5"])["generated"] == 3
    records = manifest_lines(out)
    assert [(r["region"], r["latent_factor"]) for r in records] == [("area:0.5", 8)] * 3
    default = tmp_path / "default"
    assert run_cli(cli(env, default, "--batch-size", "3", "--limit", "3", "--background", str(backgrounds)))[
        "generated"] == 3
    assert {r["region"] for r in manifest_lines(default)} == {"max-pool"}
    caplog.set_level(logging.ERROR)
    for extra, message in [(["--background", str(backgrounds), "--region", "area:2"], "region 'area:2'"),
                           (["--region", "dilate:2"], "acts only with --background")]:
        caplog.clear()
        assert main(cli(env, tmp_path / "bad", "--limit", "1", *extra)) == 1
        (line,) = error_lines(caplog)
        assert message in line and "\n" not in line
    caplog.clear()  # resuming a folder with another region is refused: its pairs were made another way
    assert main([*argv, "--region", "dilate:2"]) == 1
    assert "region" in error_lines(caplog)[0]
