"""The full model is interchangeable with the original: same state-dict keys, shapes and dtypes at SD1.5 geometry.

Built on the meta device from configs/siamese_sd15.yaml (no 1.4 B parameters are allocated).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cldm.controlnet import ControlConfig, ControlNet
from cldm.hint import DenseHintEncoder, HintEncoder
from siamese.config import load_config
from siamese.factory import build_model, meta_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _manifest_view(sd: dict[str, torch.Tensor]) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in sd.items()}


@pytest.mark.parametrize("name", ["siamese_sd15", "controlnet_sd15"])
def test_sd15_state_dict_equals_reference_manifest(reference_manifest, name):
    model = meta_model(load_config(CONFIGS / f"{name}.yaml").model)
    assert _manifest_view(model.state_dict()) == reference_manifest["keys"]


def test_zero_convs_derived_and_hint_encoder_sizes():
    cfg = load_config(CONFIGS / "siamese_sd15.yaml").model
    with torch.device("meta"):
        control = ControlNet(cfg.unet, cfg.control)
        hi = ControlNet(cfg.unet, ControlConfig(hint_encoder="hi"))
    assert len(control.zero_convs) == 12 and control.num_residuals == 13
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(control.input_hint_block) == 3_263_872  # DHI at SD1.5 (METHOD.md)
    assert count(hi.input_hint_block) == 1_086_480  # HI at SD1.5
    assert isinstance(control.input_hint_block, DenseHintEncoder) and isinstance(hi.input_hint_block, HintEncoder)


def test_tiny_model_round_trips_strictly_and_trainable_sets():
    cfg = load_config(CONFIGS / "siamese_tiny.yaml").model
    model, other = build_model(cfg), build_model(cfg)
    state = model.state_dict()
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in state
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in state.items())
    locked = model.configure_trainable(sd_locked=True)
    assert locked and all(n.startswith("control_model.") for n in locked)
    unlocked = set(model.configure_trainable(sd_locked=False))
    decoder = {n for n in unlocked if n.startswith("model.diffusion_model.")}
    assert decoder and all(n.startswith(("model.diffusion_model.output_blocks.", "model.diffusion_model.out."))
                           for n in decoder)
    assert unlocked - decoder == set(locked)


def test_build_model_on_a_device_puts_every_tensor_there():
    """The schedule buffers are computed on the CPU whatever the default device: build_model(device=...) must move
    them too, or sampling would mix devices (checked with the meta device, which every machine has)."""
    model = build_model(load_config(CONFIGS / "siamese_tiny.yaml").model, device="meta")
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}
