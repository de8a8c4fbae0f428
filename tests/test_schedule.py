"""Tests for ldm.schedule: SD1.5 beta schedule, register_schedule buffers, DDIM timesteps and update."""

from __future__ import annotations

from ldm.schedule import (
    Schedule,
    ddim_alphas,
    ddim_step,
    ddim_timesteps,
    extract,
    make_betas,
    predict_x0_from_eps,
    q_sample,
)

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.from_config("scaled_linear", 1000, 0.00085, 0.012)


def test_make_betas_endpoints_and_kinds() -> None:
    b = make_betas()
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert b[999].item() == pytest.approx(0.012, rel=1e-12)
    # scaled_linear is linear in sqrt(beta), so the midpoint differs from the plain linear schedule's.
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2
    b_odd = make_betas("scaled_linear", 1001)
    assert b_odd[500].item() == pytest.approx(mid, rel=1e-12)
    lin = make_betas("linear", 1001)
    assert lin[500].item() == pytest.approx((0.00085 + 0.012) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="cosine.*scaled_linear"):
        make_betas("cosine")


def test_schedule_float32_endpoints(sched: Schedule) -> None:
    assert sched.betas.dtype == torch.float32
    assert sched.betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert sched.betas[999].item() == pytest.approx(0.012, rel=1e-6)
    # Well-known SD1.5 noise levels sigma = sqrt((1 - abar) / abar) (k-diffusion: sigma_min 0.0292, sigma_max 14.6146).
    sigma = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    assert sigma[0].item() == pytest.approx(0.0292, abs=1e-4)
    assert sigma[999].item() == pytest.approx(14.6146, abs=1e-3)


def _reference_buffers(T: int = 1000, start: float = 0.00085, end: float = 0.012) -> dict[str, np.ndarray]:
    """Straightforward numpy formulation of ldm register_schedule (v_posterior 0, logvar_init 0)."""
    betas = np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    acp = np.append(1.0, ac[:-1])
    pv = betas * (1.0 - acp) / (1.0 - ac)
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": acp,
        "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        "posterior_variance": pv,
        "posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
        "logvar": np.zeros(T),
    }


def test_buffers_match_reference_formulas(sched: Schedule) -> None:
    ref = _reference_buffers()
    bufs = sched.buffers()
    assert list(bufs) == list(ref)
    for name, value in bufs.items():
        assert value.dtype == torch.float32, name
        expected = torch.from_numpy(ref[name]).to(torch.float32)
        # float64 -> float32 cast of the same float64 values: equal up to a rare last-ulp difference.
        torch.testing.assert_close(value, expected, rtol=2e-7, atol=0, msg=name)
    assert bufs["alphas_cumprod_prev"][0].item() == 1.0
    assert bufs["posterior_variance"][0].item() == 0.0
    assert bufs["posterior_log_variance_clipped"][0].item() == pytest.approx(np.log(1e-20), rel=1e-6)


def test_buffers_match_manifest(sched: Schedule, reference_manifest) -> None:
    keys = reference_manifest["keys"]
    expected = {k: (tuple(v[0]), v[1]) for k, v in keys.items() if "." not in k}
    got = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sched.buffers().items()}
    assert got == expected


def test_extract_shape_and_values(sched: Schedule) -> None:
    t = torch.tensor([0, 5, 999])
    out = extract(sched.alphas_cumprod, t, 4)
    assert out.shape == (3, 1, 1, 1)
    assert torch.equal(out.flatten(), sched.alphas_cumprod[t])
    assert torch.equal(sched.alpha_bar(t), sched.alphas_cumprod[t])
    with pytest.raises(ValueError, match="1-D"):
        extract(sched.alphas_cumprod, torch.tensor(3), 4)


def test_q_sample_roundtrip_recovers_x0(sched: Schedule) -> None:
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(6, 4, 8, 8, generator=g)
    eps = torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0, 1, 200, 500, 981, 999])
    z_t = sched.q_sample(z0, t, eps)
    # Method and pure-function forms agree.
    assert torch.equal(z_t, q_sample(z0, t, eps, sched.sqrt_alphas_cumprod, sched.sqrt_one_minus_alphas_cumprod))
    x0 = sched.predict_x0_from_eps(z_t, t, eps)
    assert torch.equal(
        x0, predict_x0_from_eps(z_t, t, eps, sched.sqrt_recip_alphas_cumprod, sched.sqrt_recipm1_alphas_cumprod)
    )
    assert (x0 - z0).abs().max().item() < 1e-5
    # z_t really is noisier at large t: at t=999 the signal coefficient is ~0.068.
    assert sched.sqrt_alphas_cumprod[999].item() == pytest.approx(0.0683, abs=1e-3)


def test_ddim_timesteps() -> None:
    ts = ddim_timesteps(50)
    assert ts.dtype == torch.long
    assert ts.tolist() == list(range(1, 1000, 20))
    assert ts[0] == 1 and ts[-1] == 981 and len(ts) == 50
    assert ddim_timesteps(1).tolist() == [1]
    assert ddim_timesteps(20).tolist() == list(range(1, 1000, 50))
    # Steps that the original would index out of range (t = T) are dropped; all stay valid indices.
    full = ddim_timesteps(1000)
    assert full.max().item() == 999 and full.min().item() == 1
    assert ddim_timesteps(333).max().item() < 1000
    for bad in (0, 1001, -5):
        with pytest.raises(ValueError, match="num_steps"):
            ddim_timesteps(bad)


def test_ddim_alphas_prev_uses_alphas_cumprod_0(sched: Schedule) -> None:
    ts = ddim_timesteps(50)
    a_t, a_prev = ddim_alphas(sched.alphas_cumprod, ts)
    assert torch.equal(a_t, sched.alphas_cumprod[ts])
    assert a_prev[0].item() == sched.alphas_cumprod[0].item()  # not 1.0 as in alphas_cumprod_prev
    assert torch.equal(a_prev[1:], sched.alphas_cumprod[ts[:-1]])


@pytest.mark.parametrize(("t", "t_prev"), [(981, 961), (501, 481), (21, 1), (1, 0)])
def test_ddim_step_eta0_perfect_eps_is_q_sample(sched: Schedule, t: int, t_prev: int) -> None:
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    tb = torch.full((2,), t)
    z_t = sched.q_sample(x0, tb, eps)
    z_prev = ddim_step(z_t, eps, sched.alphas_cumprod[t], sched.alphas_cumprod[t_prev], eta=0.0)
    expected = sched.q_sample(x0, torch.full((2,), t_prev), eps)
    torch.testing.assert_close(z_prev, expected, rtol=0, atol=2e-5)


def test_ddim_step_eta1_adjacent_steps_has_ddpm_posterior_std(sched: Schedule) -> None:
    # With eta = 1 and consecutive timesteps, DDIM's sigma equals the DDPM posterior std (Song et al. 2021).
    g = torch.Generator().manual_seed(2)
    z = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = 400
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
    with_noise = ddim_step(z, eps, a_t, a_prev, eta=1.0, noise=noise)
    zero_noise = ddim_step(z, eps, a_t, a_prev, eta=1.0, noise=torch.zeros_like(noise))
    std = sched.posterior_variance[t].sqrt()
    torch.testing.assert_close(with_noise - zero_noise, std * noise, rtol=1e-4, atol=1e-6)
    # eta > 0 changes the deterministic part too (smaller direction term).
    assert not torch.allclose(zero_noise, ddim_step(z, eps, a_t, a_prev, eta=0.0))
    with pytest.raises(ValueError, match="noise"):
        ddim_step(z, eps, a_t, a_prev, eta=0.5)


def test_ddim_step_per_sample_coefficients(sched: Schedule) -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    ts, tps = torch.tensor([981, 101]), torch.tensor([961, 81])
    both = ddim_step(z, eps, sched.alphas_cumprod[ts], sched.alphas_cumprod[tps])
    for i in range(2):
        single = ddim_step(z[i : i + 1], eps[i : i + 1], sched.alphas_cumprod[ts[i]], sched.alphas_cumprod[tps[i]])
        torch.testing.assert_close(both[i : i + 1], single, rtol=0, atol=0)


def test_half_precision_latents_keep_dtype(sched: Schedule) -> None:
    z = torch.randn(1, 4, 8, 8).to(torch.bfloat16)
    out = ddim_step(z, torch.zeros_like(z), sched.alphas_cumprod[981], sched.alphas_cumprod[961])
    assert out.dtype == torch.bfloat16


def test_from_betas_validation() -> None:
    with pytest.raises(ValueError, match="1-D"):
        Schedule.from_betas(torch.ones(2, 2) * 0.1)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        Schedule.from_betas(torch.tensor([0.1, 1.5]))
    s = Schedule.from_config("linear", 10, 1e-4, 2e-2)
    assert s.num_timesteps == 10 and s.to("cpu").betas.shape == (10,)
