"""Shared set-up of the sampling tests (``test_inference*.py``): a random-weight tiny checkpoint carrying its
config in the metadata (as tool_merge_control.py writes merged ones), a few generated lesion masks, few DDIM steps,
and one CLI run shared by the tests that only read its output. Imported by the test modules (fixtures included)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ldm.checkpoint import save_state_dict

import pytest
import torch

from cldm.model import ControlLDM
from siamese.config import checkpoint_metadata, load_config, with_data_prompt
from siamese.data.layout import DEFAULT_PROMPT
from siamese.data.pairs import MANIFEST_NAME
from siamese.data.synthetic import write_synthetic_dataset
from siamese.factory import build_model, load_weights
from tools.inference import build_parser, main, run

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
STEPS = "3"
NAMES = [f"synthetic_{i:06d}_k{k}" for k in range(2) for i in range(3)]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference")
    # As a merged checkpoint of a training run records it: sample.prompt resolved to the training data's prompt.
    cfg, _ = with_data_prompt(load_config(TINY), [DEFAULT_PROMPT])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():  # a fresh model has zero convolutions (ControlNet) and a zero UNet output: ε ≡ 0,
        for param in model.parameters():  # hint and prompt would change nothing. Give them weights.
            if not param.any():
                param.normal_(0.0, 0.05)
    ckpt = root / "merged.safetensors"
    save_state_dict(model.state_dict(), ckpt, metadata=checkpoint_metadata(cfg, "merged"))
    write_synthetic_dataset(root / "data", 3, 64)
    return {"root": root, "ckpt": ckpt, "masks": root / "data" / "masks"}


@pytest.fixture(scope="module")
def model(env: dict[str, Path]) -> ControlLDM:
    net = build_model(load_config(TINY).model)
    load_weights(net, env["ckpt"])
    return net.eval()


def cli(env: dict[str, Path], out: Path, *extra: str, masks: Path | None = None) -> list[str]:
    return ["--ckpt", str(env["ckpt"]), "--masks", str(masks or env["masks"]), "--out", str(out), "--steps", STEPS,
            "--n-per-mask", "2", "--no-progress", *extra]


def run_cli(argv: list[str]) -> dict[str, float]:
    return run(build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def base_out(env: dict[str, Path]) -> Path:
    out = env["root"] / "base"
    assert main(cli(env, out, "--batch-size", "3", "--grid")) == 0
    return out


def files(out: Path) -> dict[str, bytes]:
    return {f"{sub}/{p.name}": p.read_bytes() for sub in ("images", "masks") for p in sorted((out / sub).glob("*.png"))}


def manifest_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def error_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


