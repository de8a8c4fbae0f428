"""Background-preserving generation (MedDiff-FT eq. 2) as a denoise wrapper: every sampler keeps the background
outside the mask, the model path returns it exactly, and ``tutorial_inference.py --background DIR`` pairs each mask
with a seeded background."""

from __future__ import annotations

import logging

from ldm.sampler import background_denoiser
from ldm.schedule import Schedule
from ldm.solvers import sample

import cv2
import numpy as np
import pytest
import torch
from test_inference import TINY, cli, env, error_lines, manifest_lines, model, run_cli  # noqa: F401  (fixtures)

from tools.inference import main

SCHEDULE = Schedule.from_config()
SHAPE = (2, 4, 8, 8)


def toy_eps(x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
    return torch.tanh(0.7 * x + 0.001 * t.float().view(-1, 1, 1, 1)) * 0.9


def _region() -> torch.Tensor:
    region = torch.zeros(SHAPE[0], 1, *SHAPE[2:], dtype=torch.bool)
    region[:, :, 2:6, 3:7] = True
    return region


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc"])
def test_outside_the_mask_every_step_is_the_background_renoised(sampler):
    g = torch.Generator().manual_seed(0)
    background, x_T = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    region = _region()
    ac = SCHEDULE.alphas_cumprod
    seen: list[tuple[int, int, torch.Tensor]] = []
    wrapped = background_denoiser(toy_eps, background, region, ac)
    out = sample(sampler, wrapped, SHAPE, None, SCHEDULE, steps=10, x_T=x_T,
                 callback=lambda i, t, x: seen.append((i, t, x.clone())))
    # DDIM's first evaluation is at t = 901 (10 steps), the solvers' at t = 999: the fixed noise is the one that
    # makes x_T a noisy background at that step; after every step the outside pixels lie on that path.
    t0 = 901 if sampler == "ddim" else 999
    noise = (x_T - ac[t0].sqrt() * background) / (1 - ac[t0]).sqrt()
    expected_end = ac[0].sqrt() * background + (1 - ac[0]).sqrt() * noise  # every sampler's last target is ᾱ_0
    torch.testing.assert_close(out[~region.expand(SHAPE)], expected_end[~region.expand(SHAPE)], rtol=1e-4, atol=1e-4)
    assert len(seen) == 10
    if sampler == "ddim":  # the callback gets the new latent after each step: on the path at the next step's ᾱ
        ts = [t for _, t, _ in seen]
        for (_, _, x), t_next in zip(seen[:-1], ts[1:]):
            on_path = ac[t_next].sqrt() * background + (1 - ac[t_next]).sqrt() * noise
            torch.testing.assert_close(x[~region.expand(SHAPE)], on_path[~region.expand(SHAPE)], rtol=1e-4, atol=1e-4)
    # Inside the region the sampler follows the model, not the background.
    assert (out - expected_end)[region.expand(SHAPE)].abs().max() > 1e-2
    # A region covering everything is plain sampling, bit for bit.
    everything = torch.ones_like(region)
    plain = sample(sampler, toy_eps, SHAPE, None, SCHEDULE, steps=10, x_T=x_T)
    assert torch.equal(sample(sampler, background_denoiser(toy_eps, background, everything, ac), SHAPE, None,
                              SCHEDULE, steps=10, x_T=x_T), plain)


def test_model_keeps_the_background_latent_exactly(model):  # noqa: F811
    g = torch.Generator().manual_seed(1)
    hint = torch.zeros(2, 3, 64, 64)
    hint[:, :, 16:40, 20:44] = 1.0
    background = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    images = model.sample(hint, ["p", "p"], steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                          background=background)
    plain = model.sample(hint, ["p", "p"], steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    z_bg = model.first_stage_model.encode_to_latent(background, mode=True)
    recon = model.decode_latents(z_bg)
    outside = torch.ones(2, 3, 64, 64, dtype=torch.bool)
    outside[:, :, 8:48, 12:52] = False  # away from the mask: the decoder's receptive field mixes the border
    # Decoded (a random-weight tiny VAE mixes far across the image): closer to the background than without it.
    assert (images - recon)[outside].abs().mean() < 0.8 * (plain - recon)[outside].abs().mean()
    # In latent space the background is kept exactly outside the region.
    region = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    region[:, :, 2:5, 2:6] = True
    context = model.encode_prompts(["p", "p"])
    cond, uncond = {"context": context, "hint": hint}, {"context": model.encode_prompts(["", ""]), "hint": hint}
    for sampler in ("ddim", "unipc"):
        z = model.sample_latents(cond, uncond, (2, 4, 8, 8), steps=3, cfg_scale=2.0, eta=0.0, x_T=None,
                                 generator=torch.Generator().manual_seed(0), batched_cfg=True, progress=False,
                                 sampler=sampler, background=(z_bg, region))
        keep = ~region.expand(2, 4, 8, 8)
        assert torch.equal(z[keep], z_bg[keep]) and not torch.equal(z[~keep], z_bg[~keep])
    with pytest.raises(ValueError, match="expected \\(2, 3, 64, 64\\)"):
        model.sample(hint, ["p", "p"], steps=2, background=background[:, :, :32])


def _write_backgrounds(folder, count: int, size: tuple[int, int] = (64, 64)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        cv2.imwrite(str(folder / f"bg_{i}.png"), rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def test_cli_background_folder(env, tmp_path, caplog):  # noqa: F811
    backgrounds = tmp_path / "backgrounds"
    _write_backgrounds(backgrounds, 3)
    out = tmp_path / "out"
    assert run_cli(cli(env, out, "--batch-size", "3", "--background", str(backgrounds)))["generated"] == 6
    records = manifest_lines(out)
    assert all(r["backgrounds"] == str(backgrounds.resolve()) for r in records)
    assert {(out / r["background"]).resolve() for r in records} <= {p.resolve() for p in backgrounds.iterdir()}
    assert len({r["background"] for r in records}) > 1  # drawn per pair by its seed
    again = tmp_path / "again"
    assert run_cli(cli(env, again, "--batch-size", "3", "--background", str(backgrounds)))["generated"] == 6
    assert [r["background"] for r in manifest_lines(again)] == [r["background"] for r in records]
    # Resuming without the backgrounds is refused; a background of another aspect ratio gets one line.
    assert main(cli(env, out, "--batch-size", "3")) == 1
    wide = tmp_path / "wide"
    _write_backgrounds(wide, 1, (64, 96))
    caplog.clear()
    assert main(cli(env, tmp_path / "w", "--batch-size", "3", "--background", str(wide))) == 1
    (message,) = error_lines(caplog)
    assert "different aspect ratios" in message and "\n" not in message
    caplog.clear()
    assert main(cli(env, tmp_path / "e", "--background", str(tmp_path / "nowhere"))) == 1
    assert "is not a folder" in error_lines(caplog)[0]
    caplog.set_level(logging.INFO)


def test_cli_with_a_base_model_needs_backgrounds(env, tmp_path, caplog):  # noqa: F811
    """A base written by tools.pretrain (no ControlNet; e.g. MedDiff-FT's lesion-focused fine-tune) samples pairs
    through background-preserving generation only."""
    from ldm.checkpoint import save_state_dict

    from siamese.config import checkpoint_metadata, load_config
    from siamese.factory import build_latent_diffusion

    cfg = load_config(TINY, ["sample.prompt=A photo of a polyp."])  # as a trained base records its data's
    torch.manual_seed(0)
    base = build_latent_diffusion(cfg.model)
    with torch.no_grad():
        for param in base.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    ckpt = tmp_path / "base.safetensors"
    save_state_dict(base.state_dict(), ckpt, metadata=checkpoint_metadata(cfg, "base"))
    backgrounds = tmp_path / "backgrounds"
    _write_backgrounds(backgrounds, 2)
    argv = cli(env, tmp_path / "out", "--batch-size", "3", "--background", str(backgrounds))
    argv[argv.index("--ckpt") + 1] = str(ckpt)
    assert run_cli(argv)["generated"] == 6
    records = manifest_lines(tmp_path / "out")
    assert len(records) == 6 and all(r["background"] for r in records)
    caplog.clear()
    plain = cli(env, tmp_path / "plain", "--batch-size", "3")
    plain[plain.index("--ckpt") + 1] = str(ckpt)
    assert main(plain) == 1
    (message,) = error_lines(caplog)
    assert "base model without a ControlNet" in message and "--background" in message
