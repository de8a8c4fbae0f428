"""The training optimizer: torch's AdamW with its defaults, in the fused form where torch has one (cldm/lightning.py).

The fused kernel must be the same update as the per-parameter loop the released code uses (up to float rounding),
and a set of parameters it cannot take must fall back to the loop instead of failing."""

from __future__ import annotations

import torch

from cldm.lightning import make_adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 32), (32,), (8, 4, 3, 3))]


def test_fused_adamw_is_the_released_update():
    fused_params, loop_params = _params(0), _params(0)
    fused, loop = make_adamw(fused_params, 1e-3), torch.optim.AdamW(loop_params, lr=1e-3)
    assert fused.defaults["fused"] and not loop.defaults.get("fused")
    assert {k: v for k, v in fused.defaults.items() if k not in ("fused", "foreach")} == \
        {k: v for k, v in loop.defaults.items() if k not in ("fused", "foreach")}
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(fused_params, loop_params, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        fused.step()
        loop.step()
    for a, b, start in zip(fused_params, loop_params, _params(0), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - start).abs().max() > 1e-3  # five steps of lr 1e-3 moved every tensor


def test_mixed_devices_fall_back_to_the_loop():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))]
    assert not make_adamw(params, 1e-3).defaults.get("fused")
