"""Training callbacks that hold state a user would lose: the EMA of the trainable weights; and the HI hint encoder
(the original ControlNet's), which the Siamese default (DHI) does not exercise."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cldm.callbacks import EMACallback
from cldm.hint import HintEncoder


class _Module(nn.Module):
    """A LightningModule-shaped holder: the callback reads ``net`` (model names) and its trainable parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
        self.net[1].requires_grad_(False)  # frozen: not averaged


def test_ema_update_rule_matches_the_hand_computed_average(tmp_path):
    torch.manual_seed(0)
    module = _Module()
    ema = EMACallback(0.9, tmp_path / "ema.safetensors")
    ema.on_train_start(None, module)
    w0 = module.net[0].weight.detach().clone()
    assert set(ema.shadow) == {"0.weight", "0.bias"}
    with torch.no_grad():
        module.net[0].weight.add_(1.0)
    ema.on_train_batch_end(None, module)
    w1 = module.net[0].weight.detach().clone()
    with torch.no_grad():
        module.net[0].weight.mul_(-2.0)
    ema.on_train_batch_end(None, module)
    w2 = module.net[0].weight.detach().clone()
    expected = 0.9 * (0.9 * w0 + 0.1 * w1) + 0.1 * w2  # shadow ← decay · shadow + (1 − decay) · weight
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=0, atol=1e-6)
    # Restored on resume: a new callback loads the state and on_train_start keeps it (no re-initialisation).
    resumed = EMACallback(0.9, tmp_path / "ema.safetensors")
    resumed.load_state_dict(ema.state_dict())
    resumed.on_train_start(None, module)
    assert torch.equal(resumed.shadow["0.weight"], ema.shadow["0.weight"])
    resumed.on_train_end(SimpleNamespace(is_global_zero=True), module)
    from ldm.checkpoint import load_state_dict

    assert torch.equal(load_state_dict(tmp_path / "ema.safetensors")["0.weight"], resumed.shadow["0.weight"])
    with pytest.raises(ValueError, match="decay must be in"):
        EMACallback(1.0, tmp_path / "x.safetensors")


def test_hi_hint_encoder_forward_and_backward():
    torch.manual_seed(0)
    encoder = HintEncoder(3, 32)
    hint = torch.rand(2, 3, 64, 64, requires_grad=True)
    out = encoder(hint)
    assert out.shape == (2, 32, 8, 8)  # ×1/8, the UNet width
    assert torch.count_nonzero(out) == 0  # the last conv is zero-initialised
    out.sum().backward()
    assert encoder[-1].weight.grad is not None and encoder[-1].weight.grad.abs().sum() > 0  # the zero conv learns
    assert encoder[0].weight.grad.abs().sum() == 0  # nothing flows past a zero conv at initialisation
    with torch.no_grad():
        encoder[-1].weight.normal_()
    encoder.zero_grad()
    encoder(hint).pow(2).mean().backward()
    assert encoder[0].weight.grad.abs().sum() > 0 and hint.grad is not None
    assert sum(p.numel() for p in HintEncoder(3, 320).parameters()) == 1_086_480  # METHOD.md, HI at SD1.5


class _Sampling(nn.Module):
    """A LightningModule-shaped holder that records how the image callbacks ask for samples."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []
        self.net = SimpleNamespace(sample=self._sample)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _sample(self, hint, prompts, **kwargs):
        self.calls.append(kwargs)
        return torch.zeros(len(prompts), 3, 8, 8)

    def image_columns(self, samples, **kwargs):
        self.calls.append(kwargs)
        return [torch.zeros(1, 3, 8, 8)]


def test_image_callbacks_sample_with_the_configured_sampler(tmp_path):
    from cldm.callbacks import ImageLogger, MaskValidation

    trainer = SimpleNamespace(global_step=2, is_global_zero=True, loggers=[])
    module = _Sampling()
    ImageLogger(2, tmp_path, {"prompt": ["p"]}, 7, 3.0, 0, sampler="unipc").on_train_batch_end(trainer, module)
    assert module.calls[-1]["sampler"] == "unipc" and module.calls[-1]["steps"] == 7
    masks = torch.zeros(2, 3, 8, 8)
    MaskValidation(2, tmp_path, masks, ["p", "p"], 5, 2.0, 0, sampler="dpmpp_2m",
                   cfg_mask=1.5).on_train_batch_end(trainer, module)
    assert {k: module.calls[-1][k] for k in ("steps", "cfg_scale", "sampler", "cfg_mask")} == {
        "steps": 5, "cfg_scale": 2.0, "sampler": "dpmpp_2m", "cfg_mask": 1.5}
    MaskValidation(2, tmp_path, masks, ["p", "p"], 5, 2.0, 0).on_train_batch_end(trainer, module)
    assert (module.calls[-1]["sampler"], module.calls[-1]["cfg_mask"]) == ("ddim", None)  # the paper's protocol
