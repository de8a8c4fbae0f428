"""The GPU code paths at the tiny config: DeepSpeed ZeRO-2 training in fp32 / bf16 / fp16 through zero_to_fp32 and
merge, sampling in every precision, and models built on the device. Marked ``gpu`` (deselected by default; run with
``python -m pytest -m gpu`` on a machine with a CUDA device) and skipped where there is none.
"""

from __future__ import annotations

from pathlib import Path

from ldm.checkpoint import load_state_dict, save_state_dict

import numpy as np
import pytest
import torch

from siamese.config import checkpoint_metadata, load_config
from siamese.data.synthetic import write_synthetic_dataset
from siamese.factory import build_model, meta_model
from tools import inference as inference_tool
from tools import merge_control as merge_tool
from tools import train as train_tool
from tools import zero_to_fp32 as zero_tool

TINY = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_build_model_on_the_gpu():
    model = build_model(load_config(TINY).model, device="cuda")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed"])
def test_zero2_training_round_trip_on_gpu(init_ckpt, tmp_path, precision):
    out = tmp_path / "run"
    overrides = {"train.output_dir": out, "train.total_steps": 2, "train.checkpoint_every": 2,
                 "train.image_log_every": 2, "sample.steps": 2, "data.synthetic_samples": 8,
                 "train.accelerator": "gpu", "train.devices": 1, "train.precision": precision,
                 "train.init_ckpt": init_ckpt}
    cfg = load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])
    trainer = train_tool.train(cfg)
    assert trainer.global_step == 2 and (out / "images" / "step_0000002.png").is_file()
    assert zero_tool.main([str(out), str(tmp_path / "t.safetensors")]) == 0
    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(tmp_path / "t.safetensors"),
                            "--out", str(tmp_path / "m.safetensors")]) == 0
    init, merged = load_state_dict(init_ckpt), load_state_dict(tmp_path / "m.safetensors")
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    # Frozen weights keep their exact values; fp16's loss scaler may skip the first steps, so only there may
    # nothing have changed yet.
    assert changed <= set(meta_model(cfg.model).configure_trainable(cfg.method.sd_locked))
    assert changed or precision == "16-mixed"


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_sample")
    cfg = load_config(TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # zero-initialised outputs would make every prediction 0 (see test_inference.py)
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    save_state_dict(model.state_dict(), root / "merged.safetensors", metadata=checkpoint_metadata(cfg, "merged"))
    write_synthetic_dataset(root / "data", 2, 64)
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_sampling_on_gpu(merged, tmp_path, precision):
    import cv2

    argv = ["--ckpt", str(merged / "merged.safetensors"), "--masks", str(merged / "data" / "masks"), "--steps", "4",
            "--no-progress", "--batch-size", "2"]
    assert inference_tool.main(argv + ["--out", str(tmp_path / "gpu"), "--device", "cuda",
                                       "--precision", precision]) == 0
    images = sorted((tmp_path / "gpu" / "images").glob("*.png"))
    assert len(images) == 2
    if precision == "fp32":  # the same samples as on the CPU, up to kernel rounding
        assert inference_tool.main(argv + ["--out", str(tmp_path / "cpu"), "--device", "cpu"]) == 0
        for path in images:
            a = cv2.imread(str(path)).astype(np.int16)
            b = cv2.imread(str(tmp_path / "cpu" / "images" / path.name)).astype(np.int16)
            assert np.abs(a - b).max() <= 8, path.name
