"""``python -m tools.maskgen sample --eta / --sampler`` (issue 21): the mask generator samples with DDIM's η and the
solver chosen on the command line (overriding the checkpoint's config), records both in ``statistics.json``, and
the statistics it already computes (area, components, nearest-training-mask IoU) are reported at η = 0 and η = 1
on a tiny trained generator: the two runs differ."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_maskgen import CONFIG, TINY_OVERRIDES

from tools.maskgen import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("maskgen_eta")
    out = root / "maskgen.safetensors"
    assert main(["train", "--config", str(CONFIG), f"train.output_dir={root / 'run'}", *TINY_OVERRIDES,
                 "--out", str(out)]) == 0
    return out


def sample(ckpt: Path, out: Path, *extra: str) -> int:
    return main(["sample", "--ckpt", str(ckpt), "--out", str(out), "--steps", "4", "--n", "6", "--seed", "2", *extra])


def statistics(out: Path) -> dict:
    return json.loads((out / "statistics.json").read_text())


def test_eta_zero_and_one_both_recorded_and_different(ckpt: Path, tmp_path: Path) -> None:
    assert sample(ckpt, tmp_path / "default") == 0
    assert sample(ckpt, tmp_path / "eta0", "--sampler", "ddim", "--eta", "0") == 0
    assert sample(ckpt, tmp_path / "eta1", "--sampler", "ddim", "--eta", "1") == 0
    runs = {name: statistics(tmp_path / name) for name in ("default", "eta0", "eta1")}
    assert (runs["default"]["sampler"], runs["default"]["eta"]) == ("ddim", 0.0)  # the config's: ddim, η = 0
    assert (runs["eta0"]["sampler"], runs["eta0"]["eta"]) == ("ddim", 0.0)
    assert (runs["eta1"]["sampler"], runs["eta1"]["eta"]) == ("ddim", 1.0)
    masks = {name: {p.name: p.read_bytes() for p in sorted((tmp_path / name / "masks").glob("*.png"))}
             for name in runs}
    assert masks["default"] == masks["eta0"] and masks["eta0"] != masks["eta1"]
    for name in ("eta0", "eta1"):  # the statistics the summary computes, at both η (pytest -s shows them)
        s = runs[name]
        print(f"{name}: area {s['area']['generated']['mean']:.4f} (training {s['area']['training']['mean']:.4f}), "
              f"components {s['components']['generated']['mean']:.2f}, nearest-train IoU "
              f"{s['nearest_train_iou']['mean']:.4f}, empty {s['empty_generated']}, near copies {s['near_copies']}")
        assert s["generated"] == 6 and {"area", "components", "nearest_train_iou", "near_copies"} <= set(s)
    keys = ("area", "components", "nearest_train_iou")
    assert [runs["eta0"][k]["generated" if k != "nearest_train_iou" else "mean"] for k in keys] != \
        [runs["eta1"][k]["generated" if k != "nearest_train_iou" else "mean"] for k in keys]


def test_sampler_override_and_refusals(ckpt: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                       capsys: pytest.CaptureFixture) -> None:
    assert sample(ckpt, tmp_path / "unipc", "--sampler", "unipc") == 0
    assert (statistics(tmp_path / "unipc")["sampler"], statistics(tmp_path / "unipc")["eta"]) == ("unipc", 0.0)
    caplog.set_level(logging.ERROR)
    assert sample(ckpt, tmp_path / "bad", "--sampler", "dpmpp_2m", "--eta", "1") == 1
    assert sample(ckpt, tmp_path / "neg", "--eta", "-0.5") == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("\n" not in e for e in errors)
    assert "--sampler dpmpp_2m" in errors[0] and "--eta 0" in errors[0] and "--eta must be >= 0" in errors[1]
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "DDIM only; dpmpp_2m/unipc refuse η > 0" in " ".join(capsys.readouterr().out.split())
