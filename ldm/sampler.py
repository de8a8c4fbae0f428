"""DDIM sampling over a denoise function, with classifier-free guidance as a wrapper.

Re-implements the deterministic/stochastic DDIM loop of ldm's ``DDIMSampler`` (Song et al. 2021, uniform
discretisation, ε-parameterisation) and its classifier-free guidance (Ho & Salimans 2022), but in the k-diffusion
style: the sampler only knows a function ``(x_t, t_batch, cond) -> eps``. Guidance, ControlNet conditioning, the
Siamese mask branch and test oracles are all just denoise functions, so one sampler serves them all.

Conditioning objects are opaque to the sampler; for batched CFG they may be tensors, dicts of tensors, or lists of
tensors (the ldm/ControlNet ``{"c_crossattn": [...], "c_concat": [...]}`` layout), concatenated along dim 0.

``dual_cfg_denoiser`` is the two-condition guidance of InstructPix2Pix (Brooks et al. 2023, eq. 3), used to guide a
second condition (e.g. the mask hint) separately from the text. Faster ODE solvers on the same protocol, and the
``sample(sampler, …)`` dispatcher over all of them, live in ``ldm.solvers``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ldm.schedule import Schedule, ddim_alphas, ddim_step, ddim_timesteps

import torch
from torch import Tensor
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

DenoiseFn = Callable[[Tensor, Tensor, Any], Tensor]
"""``(x_t [B, …], t_batch LongTensor [B], cond) -> eps [B, …]``."""


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditioning objects of the same structure along the batch dim (``a`` first).

    Tensors are concatenated; dicts per key (same keys required); lists/tuples element-wise; ``None`` stays ``None``.
    """
    if a is None and b is None:
        return None
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            raise ValueError(f"cat_cond: conditioning dicts have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"cat_cond: conditioning lists have different lengths: {len(a)} vs {len(b)}")
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise ValueError(f"cat_cond: cannot concatenate conditioning of types {type(a).__name__} and {type(b).__name__}")


def cfg_denoiser(fn: DenoiseFn, uncond: Any, scale: float, batched: bool = True) -> DenoiseFn:
    """Classifier-free guidance: ``eps = eps(x, uncond) + scale · (eps(x, cond) − eps(x, uncond))``.

    ``batched=True`` runs both branches in one call on a doubled batch (uncond first, as ldm); ``batched=False``
    makes two calls (half the peak memory). ``scale == 1`` is the conditional prediction alone: no uncond pass.
    """
    if scale == 1.0:

        def denoise_cond(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            return fn(x, t, cond)

        return denoise_cond
    if uncond is None:
        raise ValueError(f"cfg_denoiser: guidance scale {scale} needs an unconditional conditioning, got None")

    def denoise_cfg(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        if batched:
            out = fn(torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond))
            eps_uncond, eps_cond = out.chunk(2)
        else:
            eps_uncond = fn(x, t, uncond)
            eps_cond = fn(x, t, cond)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return denoise_cfg


def dual_cfg_denoiser(fn: DenoiseFn, uncond: Any, uncond_all: Any, scale: float, scale_all: float,
                      batched: bool = True) -> DenoiseFn:
    """Two-condition classifier-free guidance, InstructPix2Pix (Brooks et al. 2023, eq. 3):

    ``eps = eps(x, uncond_all) + scale_all · (eps(x, uncond) − eps(x, uncond_all)) + scale · (eps(x, cond) −
    eps(x, uncond))``. For mask-conditioned sampling ``cond`` = (prompt, mask), ``uncond`` = ("", mask) and
    ``uncond_all`` = ("", zero hint): ``scale_all`` guides towards the mask, ``scale`` towards the text.
    ``batched=True`` runs the three branches in one call on a tripled batch (order: uncond_all, uncond, cond);
    ``batched=False`` makes three calls (a third of the peak memory). No branch is skipped at any scale.
    """
    if uncond is None or uncond_all is None:
        raise ValueError("dual_cfg_denoiser: needs both an unconditional and a fully unconditional conditioning")

    def denoise_dual(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        if batched:
            out = fn(torch.cat([x, x, x]), torch.cat([t, t, t]), cat_cond(cat_cond(uncond_all, uncond), cond))
            eps_all, eps_uncond, eps_cond = out.chunk(3)
        else:
            eps_all = fn(x, t, uncond_all)
            eps_uncond = fn(x, t, uncond)
            eps_cond = fn(x, t, cond)
        return eps_all + scale_all * (eps_uncond - eps_all) + scale * (eps_cond - eps_uncond)

    return denoise_dual


def background_denoiser(fn: DenoiseFn, background: Tensor, region: Tensor, alphas_cumprod: Tensor) -> DenoiseFn:
    """Background-preserving generation: generate inside ``region`` (1), keep the ``background`` latent outside (0).

    MedDiff-FT (Xie et al. 2025, eq. 2) blends at every denoising step the model's update inside the mask with the
    background re-noised to the same step outside it (as blended latent diffusion, Avrahami et al. 2023). Here the
    blend is a denoise wrapper, so DDIM and the ODE solvers all get it: outside the region the returned ε is the one
    whose data prediction is exactly the background, ``ε_bg = (x_t − √ᾱ_t z_bg) / √(1 − ᾱ_t)``. A deterministic
    step then moves those pixels along ``√ᾱ_t z_bg + √(1 − ᾱ_t) n`` with one fixed noise ``n``: the background
    re-noised to every step, with the same noise throughout (eq. 2 draws fresh noise; with η = 0 samplers a fixed
    draw keeps the trajectory an ODE path). The network always sees the whole latent, so the generated region is
    conditioned on the (noisy) background around it. ``region`` broadcasts against the latent (B × 1 × h × w).
    ``n`` is the noise the starting latent implies at the first evaluated step: start from ``background_start`` so
    that it is the drawn noise itself (``LatentDiffusion.sample_latents`` does).
    """

    def denoise_background(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        eps = fn(x, t, cond)
        a = alphas_cumprod.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))
        eps_bg = (x.float() - a.sqrt() * background.float()) / (1.0 - a).sqrt()
        return torch.where(region.bool(), eps, eps_bg.to(eps.dtype))

    return denoise_background


def background_start(noise: Tensor, background: Tensor, region: Tensor, alphas_cumprod: Tensor, t0: int) -> Tensor:
    """The initial latent of background-preserving sampling: ``noise`` n inside ``region`` (1), and outside it the
    background noised to the sampler's first evaluated timestep ``t0``, ``√ᾱ_{t0} z_bg + √(1 − ᾱ_{t0}) n``.

    ``background_denoiser`` keeps the outside on ``√ᾱ_t z_bg + √(1 − ᾱ_t) n'`` with the noise n' that the starting
    latent implies at ``t0``. Started from pure noise, n' = (n − √ᾱ_{t0} z_bg) / √(1 − ᾱ_{t0}) ≈ n − 0.076 z_bg at
    t0 = 981 of SD1.5's schedule: the background the network sees would carry −0.076 z_bg of extra "noise" at every
    step. Started here, n' = n: the outside is exactly the forward process q(x_t | z_bg) of MedDiff-FT's eq. 2 with one
    noise draw, from the first step on. ``t0`` comes from ``ldm.solvers.first_timestep`` (the step the start is read
    at differs between DDIM and the solvers). Computed in float32 (float64 if ``noise`` is), returned in its dtype.
    """
    work = torch.float64 if noise.dtype == torch.float64 else torch.float32
    a = alphas_cumprod[int(t0)].to(device=noise.device, dtype=work)
    n = noise.to(work)
    outside = a.sqrt() * background.to(device=noise.device, dtype=work) + (1.0 - a).sqrt() * n
    return torch.where(region.to(noise.device).bool(), n, outside).to(noise.dtype)


def clipped_denoiser(fn: DenoiseFn, alphas_cumprod: Tensor, low: float = -1.0, high: float = 1.0) -> DenoiseFn:
    """The data prediction clipped to ``[low, high]``, as pixel-space DDPM samples (Ho et al. 2020, the
    ``clip_denoised`` of their sampler): returns the ε whose ``x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t`` is the clipped one,
    so every sampler on this protocol gets it. For data known to lie in a range (binary masks in {−1, 1})."""

    def denoise_clipped(x: Tensor, t: Tensor, cond: Any) -> Tensor:
        eps = fn(x, t, cond).float()
        a = alphas_cumprod.to(x.device)[t].float().view(-1, *([1] * (x.dim() - 1)))
        x0 = ((x.float() - (1.0 - a).sqrt() * eps) / a.sqrt()).clamp(low, high)
        return ((x.float() - a.sqrt() * x0) / (1.0 - a).sqrt()).to(x.dtype)

    return denoise_clipped


Generators = torch.Generator | Sequence[torch.Generator] | None
"""One generator for the whole batch, one per sample (row ``i`` of every draw comes from ``generator[i]``, so a
sample's noise does not depend on the batch it is in), or None for the global RNG."""


def _randn(shape: Sequence[int], generator: Generators, device: torch.device, dtype: torch.dtype,
           who: str = "ddim_sample") -> Tensor:
    """Standard normal noise; drawn in float32 on the generator's device (so a seed gives the same numbers
    whatever the target dtype/device), then moved. A sequence of generators draws one batch row from each."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{who}: {len(generator)} generators for a batch of {shape[0]} (one per sample)")
        return torch.stack([_randn(shape[1:], g, device, dtype, who) for g in generator])
    draw_device = generator.device if generator is not None else device
    z = torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=torch.float32)
    return z.to(device=device, dtype=dtype)


def initial_latent(shape: Sequence[int], generator: Generators, x_T: Tensor | None,
                   device: torch.device | str | None, dtype: torch.dtype, who: str) -> Tensor:
    """A sampler's starting latent: ``x_T`` (checked against ``shape``) or fresh noise from ``generator``, on
    ``device`` (default: ``x_T``'s device, else CPU) in ``dtype``. ``who`` names the sampler in errors."""
    if device is None:
        device = x_T.device if x_T is not None else torch.device("cpu")
    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    if x_T is None:
        return _randn(shape, generator, device, dtype, who)
    if tuple(x_T.shape) != shape:
        raise ValueError(f"{who}: x_T has shape {tuple(x_T.shape)}, expected {shape}")
    return x_T.to(device=device, dtype=dtype)


@torch.no_grad()
def ddim_sample(
    denoise: DenoiseFn,
    shape: Sequence[int],
    cond: Any,
    schedule: Schedule,
    steps: int = 50,
    eta: float = 0.0,
    generator: Generators = None,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """DDIM from ``x_T`` (or fresh noise of ``shape``) down the uniform DDIM timesteps, high to low.

    ``device`` defaults to ``x_T``'s device, else CPU. Noise (``x_T`` and, for ``eta > 0``, the per-step noise) comes
    from ``generator`` (global RNG if None; a list of generators, one per sample, makes each sample's noise
    independent of its batch). ``callback(i, t, x)`` gets the step index, timestep and the new latent.
    Runs under ``no_grad``.
    """
    x = initial_latent(shape, generator, x_T, device, dtype, "ddim_sample")
    device, shape = x.device, tuple(x.shape)
    t_steps = ddim_timesteps(steps, schedule.num_timesteps)
    a_t, a_prev = ddim_alphas(schedule.alphas_cumprod.cpu(), t_steps)
    order = list(reversed(range(t_steps.numel())))
    for i, k in enumerate(tqdm(order, desc="DDIM", disable=not progress)):
        t = int(t_steps[k])
        t_batch = torch.full((shape[0],), t, dtype=torch.long, device=device)
        eps = denoise(x, t_batch, cond)
        noise = _randn(shape, generator, device, dtype) if eta > 0 else None
        x = ddim_step(x, eps, float(a_t[k]), float(a_prev[k]), eta, noise)
        if callback is not None:
            callback(i, t, x)
    return x
