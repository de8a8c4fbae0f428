"""Fast deterministic samplers beside DDIM, on the same denoise-function protocol, and the dispatcher over all three.

Both solvers integrate the diffusion ODE in the exponential-integrator form of its *data prediction*
``x̂0 = x_θ(x_t, t) = (x_t − σ_t ε_θ(x_t, t)) / α_t`` (α_t = √ᾱ_t, σ_t = √(1−ᾱ_t), λ_t = log(α_t / σ_t); between
grid points s → t, h = λ_t − λ_s > 0). Their first-order step is DDIM with η = 0:
``x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) x̂0_s``.

* **DPM-Solver++(2M)** (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
  Models", Algorithm 2: multistep, second order, data prediction): with r_i = h_{i−1} / h_i,
  ``D_i = (1 + 1/(2r_i)) x̂0_{i−1} − 1/(2r_i) x̂0_{i−2}`` and ``x_i = (σ_i/σ_{i−1}) x_{i−1} − α_i (e^{−h_i} − 1) D_i``.
* **UniPC** (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
  Models"; data prediction, B(h) = e^h − 1 (the paper's B₂, "bh2"), order 2). Predictor UniP-p and corrector UniC-p
  share one update, written with hh = −h (data prediction integrates towards −λ):
  ``x_t = (σ_t/σ_s) x_s − α_t (e^{hh} − 1) x̂0_s − α_t B(hh) Σ_m a_m D_m``, ``D_m = (x̂0_{s_m} − x̂0_s) / r_m``,
  ``r_m = (λ_{s_m} − λ_s) / h``. UniP-2 uses the point before s (r₁ < 0) with a₁ = ½. UniC-p adds the new point
  (r_p = 1, D_p = x̂0_t − x̂0_s with x̂0_t evaluated at the *predicted* x_t) and takes a from the paper's order
  condition (Theorem 3.1) ``Σ_m a_m r_m^{k−1} = k! · hh φ_{k+1}(hh) / B(hh)``, k = 1..p (φ_k the
  exponential-integrator φ functions); UniC-1 uses a₁ = ½. Both ½ are the h → 0 limits of the exact solutions
  and what the authors' reference implementation uses. With a₁ = ½ and bh2, UniP-2 is algebraically
  DPM-Solver++(2M): UniPC is that predictor plus a corrector that reuses the network evaluation at the predicted
  point (no extra evaluation). The corrector after a step has that step's predictor order; none follows the last
  step (it would need an evaluation at the end point).

**Discretisation** (both solvers, chosen by measurement: ``bench/solvers.py``, bench/README.md). ``steps`` network
evaluations at integer timesteps whose λ is uniform between λ_{T−1} and λ_0 (the uniform-λ, "logSNR", step schedule
of DPM-Solver, Lu et al. 2022a, under which the exponential integrators take equal steps h): targets
``λ_{T−1} + k (λ_0 − λ_{T−1}) / n``, k = 0..n−1, each mapped to the integer timestep of nearest λ and made strictly
decreasing and ≥ 1 from the bottom up (at many steps the low-noise end is a run 5, 4, 3, 2, 1), then a final step to
t = 0 (ᾱ_0 = 0.99915), where DDIM ends too. The first step is first order (one known x̂0), and so is the last
(diffusers' ``lower_order_final``; second order there measured no better). Why not DDIM's own grid: the uniform
*leading* timesteps start at T − T/n + 1 (901 for 10 steps of T = 1000), not at T − 1, so x_T ~ N(0, I) is read as a
less noisy latent; the solvers then converge to another trajectory than many-step DDIM and, measured on the tiny
base, end farther from a 250-step DDIM reference than DDIM itself. Starting at T − 1 (uniform "trailing" timesteps)
fixes that; spacing in λ instead of t was 5× closer again at 20 steps. Ending at σ = 0 (x̂0) instead of ᾱ_0 would
leave a constant offset of σ_0/α_0 ≈ 0.03 ε against DDIM's end point. The solver state is float32 (float64 when
``dtype`` is) whatever the network runs in: ε is cast up, x is cast to ``dtype`` only for the network call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ldm.sampler import DenoiseFn, Generators, ddim_sample, initial_latent
from ldm.schedule import Schedule, ddim_timesteps
from ldm.settings import SAMPLERS

import torch
from torch import Tensor
from tqdm.auto import tqdm

Callback = Callable[[int, int, Tensor], None]


def _lambdas(schedule: Schedule) -> Tensor:
    """λ_t = log(α_t / σ_t) = ½ log(ᾱ_t / (1 − ᾱ_t)) for every training timestep, float64 on the CPU."""
    ac = schedule.alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
    return 0.5 * torch.log(ac / (1.0 - ac))


def solver_timesteps(schedule: Schedule, steps: int) -> Tensor:
    """The solvers' evaluation timesteps, high to low (T − 1 first): uniform in λ, see the module docstring."""
    total = schedule.num_timesteps
    if not 1 <= steps <= total - 1:
        raise ValueError(f"solver steps must be in [1, {total - 1}], got {steps}")
    lam = _lambdas(schedule)
    targets = torch.linspace(float(lam[total - 1]), float(lam[0]), steps + 1, dtype=torch.float64)[:-1]
    nearest = (lam[None, :] - targets[:, None]).abs().argmin(dim=1).tolist()
    out, below = [0] * steps, 0
    for k in range(steps - 1, -1, -1):  # strictly decreasing and >= 1: t = 0 is the final point
        out[k] = below = max(int(nearest[k]), below + 1)
    return torch.tensor(out, dtype=torch.long)


class _Grid:
    """Evaluation timesteps and, for them plus the final point t = 0 (index ``len``), α, σ, λ as float64 floats."""

    def __init__(self, schedule: Schedule, steps: int):
        self.t = solver_timesteps(schedule, steps).tolist()
        ac = schedule.alphas_cumprod.detach().to(device="cpu", dtype=torch.float64)
        a_bar = [float(ac[t]) for t in [*self.t, 0]]
        self.alpha = [math.sqrt(a) for a in a_bar]
        self.sigma = [math.sqrt(1.0 - a) for a in a_bar]
        self.lam = [0.5 * math.log(a / (1.0 - a)) for a in a_bar]

    def __len__(self) -> int:
        return len(self.t)

    def h(self, i: int) -> float:
        """λ step from point ``i`` to ``i + 1``."""
        return self.lam[i + 1] - self.lam[i]

    def r(self, i: int) -> float:
        """(λ_{i−1} − λ_i) / h_i: where the previous point lies, in units of the coming step (negative)."""
        return (self.lam[i - 1] - self.lam[i]) / self.h(i)


class _DataPrediction:
    """``x̂0 = (x − σ_t ε(x, t)) / α_t`` at grid point ``i``, in the solver's precision."""

    def __init__(self, denoise: DenoiseFn, cond: Any, grid: _Grid, x: Tensor, dtype: torch.dtype):
        self.denoise, self.cond, self.grid, self.dtype = denoise, cond, grid, dtype
        self.batch, self.device = x.shape[0], x.device

    def __call__(self, x: Tensor, i: int) -> Tensor:
        t = torch.full((self.batch,), self.grid.t[i], dtype=torch.long, device=self.device)
        eps = self.denoise(x.to(self.dtype), t, self.cond).to(x.dtype)
        return (x - self.grid.sigma[i] * eps) / self.grid.alpha[i]


def _start(name: str, shape: Sequence[int], schedule: Schedule, steps: int, eta: float, generator: Generators,
           x_T: Tensor | None, device: torch.device | str | None, dtype: torch.dtype) -> tuple[Tensor, _Grid]:
    if eta != 0:
        raise ValueError(f"{name}: eta must be 0 (a deterministic ODE solver; eta > 0 needs sampler 'ddim'), got {eta}")
    grid = _Grid(schedule, steps)
    x = initial_latent(shape, generator, x_T, device, dtype, name)  # the same x_T as ddim_sample for a seed
    return x.to(torch.float64 if dtype == torch.float64 else torch.float32), grid


def _step(x_s: Tensor, x0_s: Tensor, grid: _Grid, s: int, terms: Sequence[tuple[float, Tensor]] = ()) -> Tensor:
    """From point ``s`` to ``s + 1``: ``(σ_t/σ_s) x_s − α_t (e^{−h} − 1) (x̂0_s + Σ a_m D_m)``.

    No ``terms``: the first-order step (DDIM, DPM-Solver++(1)). With B(h) = e^{−h} − 1 the UniP/UniC updates and
    DPM-Solver++(2M) are all of this form.
    """
    coef = grid.alpha[s + 1] * math.expm1(-grid.h(s))
    x0 = x0_s
    for a, d in terms:
        x0 = x0 + a * d
    return (grid.sigma[s + 1] / grid.sigma[s]) * x_s - coef * x0


@torch.no_grad()
def dpmpp_2m_sample(denoise: DenoiseFn, shape: Sequence[int], cond: Any, schedule: Schedule, steps: int = 20,
                    eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    progress: bool = False, callback: Callback | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) from ``x_T`` (or seeded noise) over the module's grid.

    Arguments as ``ldm.sampler.ddim_sample`` (``eta`` must be 0); ``steps`` network evaluations. The first and last
    steps are first order. ``callback(i, t, x)``: step index, the timestep just evaluated, the new latent.
    """
    x, grid = _start("dpmpp_2m", shape, schedule, steps, eta, generator, x_T, device, dtype)
    data = _DataPrediction(denoise, cond, grid, x, dtype)
    n, x0_prev = len(grid), None
    for i in tqdm(range(n), desc="DPM-Solver++(2M)", disable=not progress):
        x0 = data(x, i)
        if x0_prev is None or i == n - 1:
            x = _step(x, x0, grid, i)
        else:  # D_i = x̂0_{i−1} + (x̂0_{i−1} − x̂0_{i−2}) / (2 r_i), r_i = h_{i−1} / h_i
            x = _step(x, x0, grid, i, [(-0.5 / grid.r(i), x0 - x0_prev)])
        x0_prev = x0
        if callback is not None:
            callback(i, grid.t[i], x.to(dtype))
    return x.to(dtype)


def _unic_coefficients(hh: float, r1: float | None) -> tuple[float, ...]:
    """UniC-p's (a_1, …, a_p), B(hh) = e^{hh} − 1: a_1 = ½ for p = 1; for p = 2 (earlier point at ``r1``, new point
    at 1) the solution of Theorem 3.1's system ``[[1, 1], [r1, 1]] a = (1!·hh φ_2, 2!·hh φ_3) / B``."""
    if r1 is None:
        return (0.5,)
    b_h = math.expm1(hh)
    g1 = b_h / hh - 1.0  # hh φ_2(hh)
    g2 = g1 / hh - 0.5  # hh φ_3(hh)
    b1, b2 = g1 / b_h, 2.0 * g2 / b_h
    a1 = (b1 - b2) / (1.0 - r1)
    return a1, b1 - a1


@torch.no_grad()
def unipc_sample(denoise: DenoiseFn, shape: Sequence[int], cond: Any, schedule: Schedule, steps: int = 20,
                 eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 progress: bool = False, callback: Callback | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023; bh2, order 2, data prediction) from ``x_T`` (or seeded noise) over the module's grid.

    Arguments as ``ldm.sampler.ddim_sample`` (``eta`` must be 0); ``steps`` network evaluations. At every point
    after the first, the evaluation at the predicted latent first corrects it (UniC), then the predictor moves on
    (UniP-1 on the first and last steps, UniP-2 between). ``callback(i, t, x)`` after each predictor step (x = the
    predicted latent, before the correction that the next evaluation brings).
    """
    x, grid = _start("unipc", shape, schedule, steps, eta, generator, x_T, device, dtype)
    data = _DataPrediction(denoise, cond, grid, x, dtype)
    n = len(grid)
    x_s = x0_s = x0_s1 = None  # the previous point (corrected), its x̂0, and the x̂0 one point before it
    for i in tqdm(range(n), desc="UniPC", disable=not progress):
        x0 = data(x, i)  # at the predicted latent: used by the corrector and, after it, by the predictor
        if i > 0:  # UniC-p from point i − 1 to i, p = the order of the predictor that gave x
            s = i - 1
            r1 = grid.r(s) if x0_s1 is not None else None
            a = _unic_coefficients(-grid.h(s), r1)
            terms = [(a[-1], x0 - x0_s)] + ([(a[0], (x0_s1 - x0_s) / r1)] if r1 is not None else [])
            x = _step(x_s, x0_s, grid, s, terms)
        x_s, x0_s, x0_s1 = x, x0, x0_s
        if x0_s1 is None or i == n - 1:
            x = _step(x, x0, grid, i)  # UniP-1
        else:  # UniP-2, a_1 = ½, D_1 = (x̂0_{i−1} − x̂0_i) / r_1
            x = _step(x, x0, grid, i, [(0.5 / grid.r(i), x0_s1 - x0)])
        if callback is not None:
            callback(i, grid.t[i], x.to(dtype))
    return x.to(dtype)


def sampler_timesteps(sampler: str, schedule: Schedule, steps: int) -> Tensor:
    """The timesteps at which ``sampler`` evaluates the network for ``steps``, high to low (LongTensor).

    DDIM: its uniform leading grid (``ldm.schedule.ddim_timesteps``, 981, 961, …, 1 for 50 of T = 1000); the solvers:
    the uniform-λ grid of ``solver_timesteps`` (T − 1 first). The first entry is the step whose ᾱ the initial latent
    is read at: a start meant to lie on a noisy trajectory (``ldm.sampler.background_start``) needs exactly it.
    """
    if sampler == "ddim":
        return ddim_timesteps(steps, schedule.num_timesteps).flip(0)
    if sampler in _SAMPLE_FNS:
        return solver_timesteps(schedule, steps)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")


def first_timestep(sampler: str, schedule: Schedule, steps: int) -> int:
    """The first timestep ``sampler`` evaluates for ``steps`` (``sampler_timesteps(…)[0]``): 981 for DDIM with 50
    steps of T = 1000, T − 1 for dpmpp_2m and unipc."""
    return int(sampler_timesteps(sampler, schedule, steps)[0])


_SAMPLE_FNS = {"ddim": ddim_sample, "dpmpp_2m": dpmpp_2m_sample, "unipc": unipc_sample}


def sample(sampler: str, denoise: DenoiseFn, shape: Sequence[int], cond: Any, schedule: Schedule, *,
           steps: int = 50, eta: float = 0.0, generator: Generators = None, x_T: Tensor | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32, progress: bool = False,
           callback: Callback | None = None) -> Tensor:
    """Run the sampler named ``sampler`` (one of ``SAMPLERS``) with ``ddim_sample``'s arguments."""
    fn = _SAMPLE_FNS.get(sampler)
    if fn is None:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)}")
    return fn(denoise, shape, cond, schedule, steps=steps, eta=eta, generator=generator, x_T=x_T, device=device,
              dtype=dtype, progress=progress, callback=callback)
