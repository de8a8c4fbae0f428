"""Tests for ldm.solvers: DPM-Solver++(2M) and UniPC against diffusers' schedulers, the dispatcher, seeding, edges.

The references are diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` (a test-only dependency)
configured to SD1.5's betas, to our discretisation (the same integer timesteps, a final step to ᾱ_0:
``final_sigmas_type="sigma_min"``, first-order first and last steps) and driven by the same ε function from the
same x_T. No ``timestep_spacing`` of diffusers yields our λ-uniform integer grid, so the schedulers get the
timesteps explicitly (DPM-Solver: ``set_timesteps(timesteps=…)``; UniPC's ``set_timesteps`` has no such argument,
so its ``timesteps``/``sigmas`` are set after it).
"""

from __future__ import annotations

from typing import Any

from ldm.sampler import ddim_sample
from ldm.schedule import Schedule
from ldm.solvers import SAMPLERS, dpmpp_2m_sample, sample, solver_timesteps, unipc_sample
from ldm.unet import UNetConfig, UNetModel

import pytest
import torch
from torch import Tensor

SHAPE = (2, 4, 8, 8)
SOLVERS = {"dpmpp_2m": dpmpp_2m_sample, "unipc": unipc_sample}
TOL = 1e-4  # max abs difference to diffusers (float32 there, float64 coefficients here: ≈ 5e-5 measured)


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.from_config()


_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.5


def toy_eps(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
    """A deterministic nonlinear stand-in for a UNet: mixes channels, depends on t, per sample."""
    s = (t.float() / 1000.0).reshape(-1, 1, 1, 1)
    return torch.tanh(torch.einsum("ij,bjhw->bihw", _W.to(x.dtype), x) * (1 - 0.5 * s) + s) * 0.8 + 0.1 * x


@pytest.fixture(scope="module")
def unet_eps():
    """A tiny real UNet with non-zero weights everywhere (a fresh one predicts ε ≡ 0) and a fixed text context."""
    torch.manual_seed(0)
    unet = UNetModel(UNetConfig(model_channels=32, attention_resolutions=(2,), num_res_blocks=1, channel_mult=(1, 2),
                                num_heads=2, context_dim=32)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    context = torch.randn(SHAPE[0], 7, 32, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def eps(x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return unet(x, t, context[: x.shape[0]].to(x.dtype))

    return eps


def x_T(seed: int = 1) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def diffusers_sample(kind: str, eps_fn, sched: Schedule, steps: int, x: Tensor) -> Tensor:
    diffusers = pytest.importorskip("diffusers")
    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "prediction_type": "epsilon", "solver_order": 2, "final_sigmas_type": "sigma_min",
              "lower_order_final": True}
    timesteps = solver_timesteps(sched, steps).tolist()
    if kind == "dpmpp_2m":
        # euler_at_final: the last step first order at any step count (lower_order_final alone: below 15 steps)
        s = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint",
                                                  euler_at_final=True, **config)
        s.set_timesteps(timesteps=timesteps)
    else:
        s = diffusers.UniPCMultistepScheduler(solver_type="bh2", predict_x0=True, disable_corrector=[], **config)
        s.set_timesteps(steps)
        sigma = ((1 - s.alphas_cumprod) / s.alphas_cumprod) ** 0.5
        s.timesteps = torch.tensor(timesteps)
        s.sigmas = torch.cat([sigma[timesteps], sigma[:1]]).float()  # sigma[0]: what "sigma_min" appends
    assert s.timesteps.tolist() == timesteps and float(s.sigmas[-1]) == pytest.approx(float(sigma_0(sched)), rel=1e-5)
    x = x.clone()
    for t in s.timesteps:
        x = s.step(eps_fn(x, torch.full((x.shape[0],), int(t))), t, x).prev_sample
    return x


def sigma_0(sched: Schedule) -> Tensor:
    a = sched.alphas_cumprod[0].double()
    return ((1 - a) / a).sqrt()


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 50])
@pytest.mark.parametrize("kind", list(SOLVERS))
def test_matches_diffusers_on_a_toy_eps(sched: Schedule, kind: str, steps: int) -> None:
    ours = SOLVERS[kind](toy_eps, SHAPE, None, sched, steps=steps, x_T=x_T())
    ref = diffusers_sample(kind, toy_eps, sched, steps, x_T())
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_matches_diffusers_on_a_tiny_unet(sched: Schedule, unet_eps, kind: str) -> None:
    ours = SOLVERS[kind](unet_eps, SHAPE, None, sched, steps=10, x_T=x_T())
    ref = diffusers_sample(kind, unet_eps, sched, 10, x_T())
    assert (ours - ref).abs().max().item() < TOL
    assert (ours - ddim_sample(unet_eps, SHAPE, None, sched, steps=10, x_T=x_T())).abs().max() > 10 * TOL


def test_the_solvers_differ_only_by_the_corrector(sched: Schedule) -> None:
    # UniP-2 with a_1 = ½ is DPM-Solver++(2M) and both start first order: one step is the same step; with more,
    # UniPC's corrector makes the difference.
    one = [fn(toy_eps, SHAPE, None, sched, steps=1, x_T=x_T()) for fn in SOLVERS.values()]
    torch.testing.assert_close(one[0], one[1], rtol=0, atol=0)
    many = [fn(toy_eps, SHAPE, None, sched, steps=10, x_T=x_T()) for fn in SOLVERS.values()]
    assert not torch.allclose(many[0], many[1], atol=1e-3)


def test_grid(sched: Schedule) -> None:
    for steps in (1, 2, 10, 20, 50, 500, 999):
        t = solver_timesteps(sched, steps)
        assert t.numel() == steps and int(t[0]) == 999 and int(t[-1]) >= 1 and bool((t[:-1] > t[1:]).all())
    assert solver_timesteps(sched, 10).tolist() == [999, 888, 757, 597, 413, 233, 103, 36, 11, 2]
    for steps in (0, 1000):
        with pytest.raises(ValueError, match=r"solver steps must be in \[1, 999\]"):
            dpmpp_2m_sample(toy_eps, SHAPE, None, sched, steps=steps)


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_one_step_is_a_first_order_step_to_alpha_bar_0(sched: Schedule, kind: str) -> None:
    x = x_T()
    ac = sched.alphas_cumprod.double()
    a_T, a_0 = ac[999], ac[0]
    x0 = (x.double() - (1 - a_T).sqrt() * toy_eps(x.double(), torch.full((2,), 999))) / a_T.sqrt()
    expected = ((1 - a_0) / (1 - a_T)).sqrt() * x.double() + (a_0.sqrt() - ((1 - a_0) * a_T / (1 - a_T)).sqrt()) * x0
    out = SOLVERS[kind](toy_eps, SHAPE, None, sched, steps=1, x_T=x, dtype=torch.float64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_perfect_eps_lands_on_the_forward_process_at_t0(sched: Schedule, kind: str) -> None:
    # x̂0 constant along the path: an exponential integrator of any order is then exact.
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(SHAPE, generator=g) * 0.5
    ac = sched.alphas_cumprod

    def oracle(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        a = ac[t].reshape(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    x = torch.randn(SHAPE, generator=g)
    out = SOLVERS[kind](oracle, SHAPE, None, sched, steps=7, x_T=x)
    eps_T = oracle(x, torch.full((SHAPE[0],), 999), None)
    torch.testing.assert_close(out, sched.q_sample(x0, torch.zeros(SHAPE[0], dtype=torch.long), eps_T),
                               rtol=0, atol=1e-5)


def test_dispatcher(sched: Schedule) -> None:
    assert SAMPLERS == ("ddim", "dpmpp_2m", "unipc")
    for name in SAMPLERS:
        out = sample(name, toy_eps, SHAPE, None, sched, steps=4, generator=torch.Generator().manual_seed(0))
        ref = {"ddim": ddim_sample, **SOLVERS}[name](toy_eps, SHAPE, None, sched, steps=4,
                                                     generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, ref)
    with pytest.raises(ValueError) as info:
        sample("euler", toy_eps, SHAPE, None, sched, steps=4)
    assert str(info.value) == "unknown sampler 'euler'; expected one of ['ddim', 'dpmpp_2m', 'unipc']"


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_eta_is_refused(sched: Schedule, kind: str) -> None:
    with pytest.raises(ValueError, match=f"^{kind}: eta must be 0") as info:
        sample(kind, toy_eps, SHAPE, None, sched, steps=4, eta=0.5)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_per_sample_generators_make_samples_independent_of_the_batch(sched: Schedule, kind: str) -> None:
    def gens(*seeds: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in seeds]

    def cond_eps(x: Tensor, t: Tensor, cond: Tensor) -> Tensor:  # per-sample conditioning travels with the row
        return toy_eps(x, t) + cond.reshape(-1, 1, 1, 1)

    fn = SOLVERS[kind]
    abc = fn(cond_eps, (3, 4, 8, 8), torch.tensor([0.1, 0.2, 0.3]), sched, steps=5, generator=gens(7, 8, 9))
    cb = fn(cond_eps, (2, 4, 8, 8), torch.tensor([0.3, 0.2]), sched, steps=5, generator=gens(9, 8))
    torch.testing.assert_close(abc[2], cb[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(abc[1], cb[1], rtol=0, atol=1e-6)
    # Same start as DDIM for the same generators.
    start = []
    fn(lambda x, t, c: start.append(x.clone()) or toy_eps(x, t), SHAPE, None, sched, steps=1, generator=gens(1, 2))
    ddim_start = []
    ddim_sample(lambda x, t, c: ddim_start.append(x.clone()) or toy_eps(x, t), SHAPE, None, sched, steps=1,
                generator=gens(1, 2))
    assert torch.equal(start[0], ddim_start[0])
    with pytest.raises(ValueError, match=f"{kind}: 1 generators for a batch of 2"):
        fn(toy_eps, SHAPE, None, sched, steps=2, generator=gens(1))


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_low_precision_network_and_callback(sched: Schedule, kind: str) -> None:
    seen: list[tuple[int, int, torch.dtype]] = []

    def bf16_eps(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        assert x.dtype == torch.bfloat16
        return toy_eps(x.float(), t).to(torch.bfloat16)

    out = SOLVERS[kind](bf16_eps, SHAPE, None, sched, steps=6, x_T=x_T(), dtype=torch.bfloat16,
                        callback=lambda i, t, x: seen.append((i, t, x.dtype)))
    assert out.dtype == torch.bfloat16
    assert seen == [(i, t, torch.bfloat16) for i, t in enumerate(solver_timesteps(sched, 6).tolist())]
    full = SOLVERS[kind](toy_eps, SHAPE, None, sched, steps=6, x_T=x_T().bfloat16().float())
    # bf16 ε, float32 solver state: within bf16's own rounding of the result (8 significant bits), no drift.
    assert (out.float() - full).abs().max().item() < 2 ** -7 * full.abs().max().item()


@pytest.mark.parametrize("kind", list(SOLVERS))
def test_converges_faster_than_ddim_on_a_tiny_unet(sched: Schedule, unet_eps, kind: str) -> None:
    reference = ddim_sample(unet_eps, SHAPE, None, sched, steps=250, x_T=x_T())

    def rms(a: Tensor) -> float:
        return (a - reference).pow(2).mean().sqrt().item()

    ddim_20 = rms(ddim_sample(unet_eps, SHAPE, None, sched, steps=20, x_T=x_T()))
    solver_20 = rms(SOLVERS[kind](unet_eps, SHAPE, None, sched, steps=20, x_T=x_T()))
    assert solver_20 < ddim_20
