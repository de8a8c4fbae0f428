"""The hint encoder runs once per sampling call (``ControlLDM.hint_condition``), not once per step and guidance row.

The hint encoder (HI / DHI, ``control_model.input_hint_block``) depends on neither the timestep nor the prompt, so
``ControlLDM.sample`` encodes each hint once and every step of every sampler reuses the feature. These tests check,
on the tiny config with non-zero weights, that this changes nothing but float rounding against the per-step path
(``encode_hint_once=False``, what the released code does): the batched kernels see B rows once instead of 2B rows per
step, so the last bits differ, and guidance at scale 9 amplifies them. Tolerance: final latents within 1e-5 relative
L2 (measured 3.5–4.7e-6 with these random weights; the encoded hints themselves agree to float32 rounding). Training
never takes the cached path (``ControlNet.forward`` without ``hint_feature`` is unchanged; the parity tests cover it).
"""

from __future__ import annotations

import pytest
import torch
from _inference_env import TINY

from cldm.model import ControlLDM
from siamese.config import load_config
from siamese.factory import build_model

SIZE = 32  # hint pixels (latent 4 × 4): the smallest the tiny UNet takes, to keep the test short
TOL = 1e-5


@pytest.fixture(scope="module")
def model() -> ControlLDM:
    torch.manual_seed(0)
    net = build_model(load_config(TINY).model).eval()
    with torch.no_grad():  # zero convs and a zero UNet output would make ε ≡ 0 and the hint irrelevant
        for param in net.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return net


def _hint(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return (torch.rand(batch, 1, SIZE, SIZE, generator=g) > 0.5).float().expand(batch, 3, SIZE, SIZE).contiguous()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_controlnet_with_the_encoded_hint_is_the_same_function(model: ControlLDM) -> None:
    control = model.control_model
    hint, x = _hint(), torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(1))
    t, context = torch.tensor([999, 10]), torch.randn(2, 77, model.unet.config.context_dim)
    with torch.no_grad():
        plain = control(x, hint, t, context)
        cached = control(x, None, t, context, hint_feature=control.encode_hint(hint))
    assert all(torch.equal(a, b) for a, b in zip(plain, cached, strict=True))  # same rows, same kernels: exact
    with pytest.raises(ValueError, match="hint_feature"):
        control(x, None, t, context, hint_feature=torch.zeros(2, 32, 2, 2))
    # the feature of one row is that row's feature in a batch, to float rounding
    torch.testing.assert_close(control.encode_hint(hint[:1]), control.encode_hint(hint)[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("sampler", "batched"), [("ddim", True), ("ddim", False), ("dpmpp_2m", True),
                                                  ("unipc", True)])
def test_encoding_once_equals_encoding_every_step(model: ControlLDM, sampler: str, batched: bool) -> None:
    hint, prompts = _hint(), ["A photo of a polyp.", "a lesion"]
    calls: list[int] = []
    handle = model.control_model.input_hint_block.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        latents = {}
        for once in (False, True):
            calls.clear()
            g = [torch.Generator().manual_seed(s) for s in (11, 12)]
            latents[once] = model.sample(hint, prompts, steps=3, cfg_scale=9.0, generator=g, sampler=sampler,
                                         batched_cfg=batched, encode_hint_once=once, decode=False)
            # every network call re-encodes (3 steps, 4 rows or 2 × 2 rows) unless the feature is cached
            assert calls == ([2] if once else [4] * 3 if batched else [2] * 6)
    finally:
        handle.remove()
    assert _rel(latents[True], latents[False]) <= TOL


def test_mask_guidance_encodes_the_zero_hint_once_too(model: ControlLDM) -> None:
    hint, prompts = _hint(1), ["A photo of a polyp."]
    out = {once: model.sample(hint, prompts, steps=3, cfg_scale=9.0, cfg_mask=2.0, sampler="unipc",
                              generator=torch.Generator().manual_seed(5), encode_hint_once=once, decode=False)
           for once in (False, True)}
    assert _rel(out[True], out[False]) <= TOL
