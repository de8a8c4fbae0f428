"""Background-preserving sampling starts on the background's trajectory (MedDiff-FT eq. 2, issue 21).

Outside the generated region the latent the network sees at every step must be the background noised to that step,
``√ᾱ_t z_bg + √(1 − ᾱ_t) n``, with one noise n from the very first evaluation on (``ldm.sampler.background_start``
at ``ldm.solvers.first_timestep``); inside it the start is the seeded noise n itself. Checked on a tiny real
``LatentDiffusion`` by recording what its denoise function receives, for DDIM and an ODE solver.
"""

from __future__ import annotations

from pathlib import Path

from ldm.regions import latent_region
from ldm.sampler import background_start
from ldm.schedule import Schedule
from ldm.solvers import first_timestep, sample, sampler_timesteps

import pytest
import torch

from siamese.config import load_config
from siamese.factory import build_latent_diffusion

TINY = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"
SIZE, BATCH, SEEDS = 64, 2, (11, 12)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    net = build_latent_diffusion(load_config(TINY).model)
    with torch.no_grad():  # a fresh UNet has a zero output layer (ε ≡ 0): give every zero tensor weights
        for param in net.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return net.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    background = torch.rand(BATCH, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.zeros(BATCH, 1, SIZE, SIZE)
    mask[0, :, 16:40, 20:44] = 1.0
    mask[1, :, 30:50, 8:30] = 1.0
    return background, mask


def test_first_timestep_is_the_first_evaluation() -> None:
    schedule = Schedule.from_config()
    assert first_timestep("ddim", schedule, 50) == 981 and first_timestep("ddim", schedule, 10) == 901
    assert first_timestep("dpmpp_2m", schedule, 20) == first_timestep("unipc", schedule, 20) == 999
    for sampler in ("ddim", "dpmpp_2m", "unipc"):
        seen: list[int] = []

        def record(x, t, cond, seen=seen):
            seen.append(int(t[0]))
            return torch.zeros_like(x)

        sample(sampler, record, (1, 1, 2, 2), None, schedule, steps=7)
        assert seen[0] == first_timestep(sampler, schedule, 7)
        assert seen == sampler_timesteps(sampler, schedule, 7).tolist()
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        first_timestep("euler", schedule, 10)


def test_background_start_blends_one_noise() -> None:
    ac = Schedule.from_config().alphas_cumprod
    g = torch.Generator().manual_seed(0)
    noise, z_bg = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    region = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    region[:, :, 1:3, 1:3] = True
    x = background_start(noise, z_bg, region, ac, 981)
    inside = region.expand_as(noise)
    assert torch.equal(x[inside], noise[inside])
    expected = ac[981].sqrt() * z_bg + (1 - ac[981]).sqrt() * noise
    torch.testing.assert_close(x[~inside], expected[~inside], rtol=0, atol=1e-6)
    assert torch.equal(background_start(noise, z_bg, torch.ones_like(region), ac, 981), noise)


@pytest.mark.parametrize(("sampler", "steps"), [("ddim", 5), ("dpmpp_2m", 5)])
def test_the_outside_lies_on_one_noisy_background_path(base, sampler: str, steps: int) -> None:
    background, mask = _inputs()
    seen: list[tuple[int, torch.Tensor]] = []
    finals: list[torch.Tensor] = []
    denoise, decode = base.denoise, base.decode_latents

    def record(x, t, cond):
        seen.append((int(t[0]), x.detach().clone()))
        return denoise(x, t, cond)

    def keep_latent(z):
        finals.append(z.detach().clone())
        return decode(z)

    base.denoise, base.decode_latents = record, keep_latent  # instance attributes: sample_latents calls these
    try:
        base.sample(["a lesion"] * BATCH, SIZE, steps=steps, cfg_scale=1.0, sampler=sampler,
                    generator=[torch.Generator().manual_seed(s) for s in SEEDS], background=background, mask=mask)
    finally:
        del base.denoise, base.decode_latents
    z_bg = base.first_stage_model.encode_to_latent(background, mode=True)
    region = latent_region(mask, z_bg.shape[-2:]).expand_as(z_bg)
    noise = torch.stack([torch.randn(z_bg.shape[1:], generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    ac = base.alphas_cumprod
    assert [t for t, _ in seen] == sampler_timesteps(sampler, base.schedule, steps).tolist()
    assert seen[0][0] == first_timestep(sampler, base.schedule, steps)
    torch.testing.assert_close(seen[0][1][region], noise[region], rtol=0, atol=1e-6)  # inside: the seeded noise
    for t, x in seen:  # outside, at every evaluation from the first: the background noised with that one noise
        on_path = ac[t].sqrt() * z_bg + (1 - ac[t]).sqrt() * noise
        torch.testing.assert_close(x[~region], on_path[~region], rtol=0, atol=1e-5, msg=f"{sampler} at t = {t}")
    (final,) = finals
    assert torch.equal(final[~region], z_bg[~region])  # the returned latent keeps the background exactly
    assert not torch.allclose(final[region], z_bg[region], atol=1e-2)  # and generates inside
