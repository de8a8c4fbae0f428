"""Diffusion schedule of Stable Diffusion 1.5 as pure tensor functions.

Re-implements the schedule buffers of the original latent-diffusion ``DDPM.register_schedule`` (CompVis/ldm, as used
by ControlNet and Siamese-Diffusion) with ε-parameterisation, ``v_posterior = 0``, ``learn_logvar = False`` and
``logvar_init = 0``, plus the uniform DDIM discretisation and the DDIM update of ldm's ``DDIMSampler``. Everything is
computed in float64 and cast to float32 once, as the original does with numpy, so the buffers match SD1.5 checkpoints.

The functions take schedule tensors explicitly instead of living on an ``nn.Module``: training code, the sampler and
tests can use them on any device without a god-class. ``Schedule`` is a small frozen holder of the float32 tensors.

Notation: ``a_t = ᾱ_t = alphas_cumprod[t]``; ``z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε``.
"""

from __future__ import annotations

import dataclasses
import logging

from ldm.settings import BETA_KINDS  # noqa: F401  (re-exported)

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

# Order and names of the 13 un-prefixed schedule buffers in an original ldm/ControlNet state dict.
BUFFER_NAMES: tuple[str, ...] = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
)


def make_betas(
    kind: str = "scaled_linear", timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012
) -> Tensor:
    """Beta schedule in float64.

    ``scaled_linear``: ``linspace(√start, √end, T)²`` — what SD1.5 uses (NB: the original ldm calls this one
    ``"linear"``). ``linear``: ``linspace(start, end, T)`` (ldm's ``"sqrt_linear"``).
    """
    if timesteps < 1:
        raise ValueError(f"make_betas: timesteps must be >= 1, got {timesteps}")
    if kind == "scaled_linear":
        # Always on the CPU in float64 (also inside a meta-device context): the buffers are tiny and exact.
        return torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2
    if kind == "linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64, device="cpu")
    raise ValueError(f"make_betas: unknown beta schedule kind {kind!r}; expected one of {list(BETA_KINDS)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Float32 schedule tensors of length T (``eq=False``: tensors do not compare to a bool)."""

    betas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    log_one_minus_alphas_cumprod: Tensor
    sqrt_recip_alphas_cumprod: Tensor
    sqrt_recipm1_alphas_cumprod: Tensor
    posterior_variance: Tensor
    posterior_log_variance_clipped: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor
    logvar: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        """All buffers from a 1-D beta tensor, computed in float64 and cast to float32 (as register_schedule)."""
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"Schedule.from_betas: expected a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        b = betas.detach().to(device="cpu", dtype=torch.float64)
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("Schedule.from_betas: every beta must lie in (0, 1)")
        alphas = 1.0 - b
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) with v_posterior = 0; its variance is 0 at t = 0, hence the clipped log.
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        f32 = {
            "betas": b,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            # logvar_init = 0 and not learned: a zero buffer kept only for state-dict compatibility.
            "logvar": torch.zeros_like(b),
        }
        return cls(**{k: v.to(torch.float32) for k, v in f32.items()})

    @classmethod
    def from_config(
        cls,
        kind: str = "scaled_linear",
        timesteps: int = 1000,
        linear_start: float = 0.00085,
        linear_end: float = 0.012,
    ) -> Schedule:
        return cls.from_betas(make_betas(kind, timesteps, linear_start, linear_end))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def buffers(self) -> dict[str, Tensor]:
        """The 13 buffers under their original (un-prefixed) state-dict names."""
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def to(self, device: torch.device | str) -> Schedule:
        """A copy with every tensor on ``device`` (dtype stays float32)."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.buffers().items()})

    def alpha_bar(self, t: Tensor) -> Tensor:
        """ᾱ_t gathered at integer timesteps ``t`` (same shape as ``t``, on ``t``'s device)."""
        return alpha_bar(self.alphas_cumprod, t)

    def q_sample(self, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return q_sample(z0, t, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)

    def predict_x0_from_eps(self, z_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return predict_x0_from_eps(z_t, t, eps, self.sqrt_recip_alphas_cumprod, self.sqrt_recipm1_alphas_cumprod)


def extract(a: Tensor, t: Tensor, ndim: int) -> Tensor:
    """``a[t]`` per sample, reshaped to ``[B, 1, …, 1]`` (``ndim`` dims) so it broadcasts against a batch.

    ``a`` is moved to ``t``'s device, so a CPU schedule works with accelerator timesteps.
    """
    if t.ndim != 1:
        raise ValueError(f"extract: timesteps must be a 1-D tensor [B], got shape {tuple(t.shape)}")
    out = a.to(t.device)[t.long()]
    return out.reshape(t.shape[0], *((1,) * (ndim - 1)))


def alpha_bar(alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """ᾱ_t at integer timesteps ``t`` (any shape)."""
    return alphas_cumprod.to(t.device)[t.long()]


def q_sample(z0: Tensor, t: Tensor, noise: Tensor, sqrt_ac: Tensor, sqrt_1mac: Tensor) -> Tensor:
    """Forward process ``z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε`` (ldm ``DDPM.q_sample``)."""
    return extract(sqrt_ac, t, z0.ndim) * z0 + extract(sqrt_1mac, t, z0.ndim) * noise


def predict_x0_from_eps(z_t: Tensor, t: Tensor, eps: Tensor, sqrt_recip_ac: Tensor, sqrt_recipm1_ac: Tensor) -> Tensor:
    """``ẑ0 = √(1/ᾱ_t) z_t − √(1/ᾱ_t − 1) ε`` — the form of ldm's ``predict_start_from_noise`` (used by the released
    Siamese-Diffusion L_aug); algebraically equal to ``(z_t − √(1−ᾱ_t) ε) / √ᾱ_t``."""
    return extract(sqrt_recip_ac, t, z_t.ndim) * z_t - extract(sqrt_recipm1_ac, t, z_t.ndim) * eps


def ddim_timesteps(num_steps: int, timesteps: int = 1000) -> Tensor:
    """Uniform DDIM timesteps as in ldm ``make_ddim_timesteps``: ``range(0, T, T // n) + 1`` (ascending).

    50 of 1000 → 1, 21, …, 981. Like the original, when ``T % n != 0`` this yields ``ceil(T / (T // n))`` steps
    rather than exactly ``n``. Where the ``+1`` shift would reach index T (the original crashes there, e.g. n = T),
    that last step is dropped.
    """
    if not 1 <= num_steps <= timesteps:
        raise ValueError(f"ddim_timesteps: num_steps must be in [1, {timesteps}], got {num_steps}")
    stride = timesteps // num_steps
    steps = torch.arange(0, timesteps, stride, dtype=torch.long) + 1
    steps = steps[steps < timesteps]
    if steps.numel() != num_steps:
        logger.info(
            "ddim_timesteps: %d requested steps of T=%d give %d uniform steps", num_steps, timesteps, steps.numel()
        )
    return steps


def ddim_alphas(alphas_cumprod: Tensor, steps: Tensor) -> tuple[Tensor, Tensor]:
    """(ᾱ at each DDIM step, ᾱ at the previous DDIM step), as ldm ``make_ddim_sampling_parameters``.

    The lowest step's "previous" value is ``alphas_cumprod[0]`` (not 1), exactly as the original.
    """
    ac = alphas_cumprod.to(steps.device)
    a_t = ac[steps]
    a_prev = torch.cat([ac[:1], ac[steps[:-1]]])
    return a_t, a_prev


def _as_coef(a: Tensor | float, like: Tensor) -> Tensor:
    """A scalar or per-sample [B] coefficient as a float tensor broadcastable against ``like``.

    Coefficients stay in float32 (float64 if ``like`` is) so half-precision latents do not lose the schedule's
    precision before the products are formed.
    """
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    a = torch.as_tensor(a, dtype=dtype, device=like.device)
    if a.ndim == 1:
        a = a.reshape(a.shape[0], *((1,) * (like.ndim - 1)))
    return a


def ddim_step(
    z_t: Tensor,
    eps: Tensor,
    a_t: Tensor | float,
    a_prev: Tensor | float,
    eta: float = 0.0,
    noise: Tensor | None = None,
) -> Tensor:
    """One DDIM update (ldm ``DDIMSampler.p_sample_ddim``, ε-parameterisation, no clipping).

    ``ẑ0 = (z_t − √(1−ᾱ_t) ε)/√ᾱ_t``; ``z_prev = √ᾱ_prev ẑ0 + √(1−ᾱ_prev−σ²) ε + σ·noise``.
    ``a_t``/``a_prev`` are scalars or per-sample [B] tensors; ``noise`` is required when ``eta > 0``.
    """
    if eta < 0:
        raise ValueError(f"ddim_step: eta must be >= 0, got {eta}")
    at = _as_coef(a_t, z_t)
    ap = _as_coef(a_prev, z_t)
    sigma = eta * ((1 - ap) / (1 - at) * (1 - at / ap)).sqrt()
    pred_x0 = (z_t - (1 - at).sqrt() * eps) / at.sqrt()
    # clamp: with η = 1 and ᾱ_prev ≈ ᾱ_t rounding can push 1−ᾱ_prev−σ² a hair below 0.
    z_prev = ap.sqrt() * pred_x0 + (1 - ap - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step: eta > 0 needs a noise tensor of the latent's shape")
        z_prev = z_prev + sigma * noise
    return z_prev.to(z_t.dtype)
