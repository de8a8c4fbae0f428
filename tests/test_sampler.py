"""Tests for ldm.sampler: DDIM walk order, seeding, classifier-free guidance and x0 recovery."""

from __future__ import annotations

from typing import Any

from ldm.sampler import cat_cond, cfg_denoiser, ddim_sample, dual_cfg_denoiser
from ldm.schedule import Schedule

import pytest
import torch
from torch import Tensor

SHAPE = (2, 4, 8, 8)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.from_config()


def toy_eps(x: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
    """A nonlinear, cond- and t-dependent stand-in for a UNet (per-sample, so batching must not matter)."""
    scale = (t.float() / 1000.0).reshape(-1, 1, 1, 1)
    return torch.tanh(x * cond["w"].reshape(-1, 1, 1, 1) + scale) + cond["b"].reshape(-1, 1, 1, 1)


def make_cond(w: float, b: float, n: int = SHAPE[0]) -> dict[str, Tensor]:
    return {"w": torch.full((n,), w), "b": torch.full((n,), b)}


def test_ddim_visits_981_down_to_1(sched: Schedule) -> None:
    seen: list[int] = []
    cb: list[tuple[int, int]] = []

    def denoise(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        assert t.dtype == torch.long and t.shape == (SHAPE[0],) and bool((t == t[0]).all())
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    out = ddim_sample(
        denoise,
        SHAPE,
        None,
        sched,
        steps=50,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, t, x: cb.append((i, t)),
    )
    assert seen == list(range(981, 0, -20))
    assert cb == list(enumerate(range(981, 0, -20)))
    assert out.shape == SHAPE and out.dtype == torch.float32


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_seeding(sched: Schedule, eta: float) -> None:
    cond = make_cond(0.5, 0.1)

    def run(seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        return ddim_sample(toy_eps, SHAPE, cond, sched, steps=10, eta=eta, generator=gen)

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_eta_noise_comes_from_generator(sched: Schedule) -> None:
    # Same x_T, different generators: eta = 0 ignores them, eta > 0 draws per-step noise from them.
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond = make_cond(0.5, 0.1)

    def run(seed: int, eta: float) -> Tensor:
        return ddim_sample(
            toy_eps, SHAPE, cond, sched, steps=10, eta=eta, x_T=x_T, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1, 0.0), run(2, 0.0))
    assert not torch.allclose(run(1, 1.0), run(2, 1.0))


def test_cfg_scale_one_is_conditional_only() -> None:
    calls: list[Any] = []

    def fn(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        calls.append(cond)
        return toy_eps(x, t, cond)

    cond, uncond = make_cond(0.5, 0.1), make_cond(-1.0, 0.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((SHAPE[0],), 501)
    for batched in (True, False):
        calls.clear()
        out = cfg_denoiser(fn, uncond, 1.0, batched=batched)(x, t, cond)
        assert torch.equal(out, toy_eps(x, t, cond))
        assert len(calls) == 1 and calls[0] is cond


def test_cfg_batched_equals_unbatched_and_formula() -> None:
    shapes: list[tuple[int, ...]] = []

    def fn(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        shapes.append(tuple(x.shape))
        return toy_eps(x, t, cond)

    cond, uncond = make_cond(0.5, 0.1), make_cond(-1.0, 0.0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((SHAPE[0],), 501)
    batched = cfg_denoiser(fn, uncond, 9.0, batched=True)(x, t, cond)
    assert shapes == [(2 * SHAPE[0], *SHAPE[1:])]
    shapes.clear()
    unbatched = cfg_denoiser(fn, uncond, 9.0, batched=False)(x, t, cond)
    assert shapes == [SHAPE, SHAPE]
    torch.testing.assert_close(batched, unbatched)
    e_u, e_c = toy_eps(x, t, uncond), toy_eps(x, t, cond)
    torch.testing.assert_close(batched, e_u + 9.0 * (e_c - e_u))
    assert not torch.allclose(batched, e_c)


def test_cfg_needs_uncond() -> None:
    with pytest.raises(ValueError, match="unconditional"):
        cfg_denoiser(toy_eps, None, 9.0)


@pytest.mark.parametrize(("scale", "scale_all"), [(9.0, 2.0), (1.0, 1.0), (3.0, 0.0)])
def test_dual_cfg_is_the_instructpix2pix_formula(scale: float, scale_all: float) -> None:
    shapes: list[tuple[int, ...]] = []

    def fn(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        shapes.append(tuple(x.shape))
        return toy_eps(x, t, cond)

    cond, uncond, uncond_all = make_cond(0.5, 0.1), make_cond(-1.0, 0.0), make_cond(0.3, -0.2)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.full((SHAPE[0],), 501)
    batched = dual_cfg_denoiser(fn, uncond, uncond_all, scale, scale_all, batched=True)(x, t, cond)
    assert shapes == [(3 * SHAPE[0], *SHAPE[1:])]
    shapes.clear()
    unbatched = dual_cfg_denoiser(fn, uncond, uncond_all, scale, scale_all, batched=False)(x, t, cond)
    assert shapes == [SHAPE] * 3
    # Brooks et al. 2023, eq. 3: e(∅, ∅) + s_I (e(c_I, ∅) − e(∅, ∅)) + s_T (e(c_I, c_T) − e(c_I, ∅)).
    e_0, e_u, e_c = toy_eps(x, t, uncond_all), toy_eps(x, t, uncond), toy_eps(x, t, cond)
    expected = e_0 + scale_all * (e_u - e_0) + scale * (e_c - e_u)
    torch.testing.assert_close(batched, expected)
    torch.testing.assert_close(unbatched, expected)
    if scale_all == 1.0:  # s_m = 1 is plain CFG
        torch.testing.assert_close(batched, cfg_denoiser(toy_eps, uncond, scale)(x, t, cond))
    with pytest.raises(ValueError, match="fully unconditional"):
        dual_cfg_denoiser(fn, uncond, None, scale, scale_all)


def test_cat_cond_structures() -> None:
    a = {"c_crossattn": [torch.zeros(1, 3)], "c_concat": [torch.zeros(1, 2)], "none": None}
    b = {"c_crossattn": [torch.ones(1, 3)], "c_concat": [torch.ones(1, 2)], "none": None}
    out = cat_cond(a, b)
    assert out["none"] is None
    assert torch.equal(out["c_crossattn"][0], torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert out["c_concat"][0].shape == (2, 2)
    with pytest.raises(ValueError, match="different keys"):
        cat_cond({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot concatenate"):
        cat_cond(torch.zeros(1), [torch.zeros(1)])


def test_perfect_eps_recovers_x0(sched: Schedule) -> None:
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g) * 0.5
    ac = sched.alphas_cumprod

    def oracle(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        a = ac[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    x_T = torch.randn(SHAPE, generator=g)
    out = ddim_sample(oracle, SHAPE, None, sched, steps=50, x_T=x_T)
    # With a perfect predictor the implied noise is constant along the path; ldm's last DDIM step lands on
    # alphas_cumprod[0] (not 1), so the output is q_sample(x0, 0, eps_T): x0 up to a ~3% noise residue.
    eps_T = oracle(x_T, torch.full((SHAPE[0],), 981), None)
    torch.testing.assert_close(
        out, sched.q_sample(x0, torch.zeros(SHAPE[0], dtype=torch.long), eps_T), rtol=0, atol=1e-4
    )
    assert (out - x0).abs().mean().item() < 0.05
    # Far closer than the starting noise was.
    assert (x_T - x0).abs().mean().item() > 0.5


def test_dtype_device_and_x_T_validation(sched: Schedule) -> None:
    out = ddim_sample(
        toy_eps,
        SHAPE,
        make_cond(0.5, 0.1),
        sched,
        steps=5,
        dtype=torch.float64,
        device="cpu",
        generator=torch.Generator().manual_seed(0),
        progress=True,
    )
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    # Seeded noise does not depend on the requested dtype.
    out32 = ddim_sample(toy_eps, SHAPE, make_cond(0.5, 0.1), sched, steps=5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.float(), out32, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="x_T has shape"):
        ddim_sample(toy_eps, SHAPE, None, sched, x_T=torch.zeros(1, 4, 8, 8))


def test_clipped_denoiser_clamps_the_data_prediction():
    from ldm.sampler import clipped_denoiser

    sched = Schedule.from_config("linear", 1000, 1e-4, 2e-2)
    ac = sched.alphas_cumprod
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    t = torch.tensor([10, 500, 990])

    def wild(x_t, t_batch, cond):  # an ε whose x̂0 lies far outside [-1, 1]
        a = ac[t_batch].view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * 5.0) / (1 - a).sqrt()

    eps = clipped_denoiser(wild, ac)(x, t, None)
    a = ac[t].view(-1, 1, 1, 1)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(x0, torch.ones_like(x0), rtol=0, atol=1e-4)
    inside = clipped_denoiser(lambda x_t, tb, c: torch.zeros_like(x_t), ac)(x * 1e-4, t, None)
    torch.testing.assert_close(inside, torch.zeros_like(inside), rtol=0, atol=1e-5)  # x̂0 in range: unchanged
