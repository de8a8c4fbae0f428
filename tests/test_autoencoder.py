"""Tests for ldm.autoencoder: SD1.5 key/shape parity on the meta device, tiny-VAE shapes and sampling, attention
parity against an explicit softmax(QK^T/sqrt(C))V reference, and the identity first stage."""

from __future__ import annotations

import math
from pathlib import Path

from ldm.attention import group_norm_groups as group_count
from ldm.autoencoder import AttnBlock, AutoencoderKL, DiagonalGaussian, IdentityFirstStage

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MANIFEST_NAME = "official_controlldm_sd15_keys.json"

SD15_DDCONFIG = dict(embed_dim=4, double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                     ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def _tiny(**overrides: object) -> AutoencoderKL:
    cfg = dict(embed_dim=4, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2, 2, 2],
               num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    cfg.update(overrides)
    torch.manual_seed(0)
    return AutoencoderKL(**cfg).freeze()


def test_sd15_keys_and_shapes_match_manifest(reference_manifest) -> None:
    keys = reference_manifest["keys"]
    expected = {k: tuple(v[0]) for k, v in keys.items() if k.startswith("first_stage_model.")}
    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_DDCONFIG)
    got = {"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert set(got) - set(expected) == set(), "unexpected keys"
    assert set(expected) - set(got) == set(), "missing keys"
    assert got == expected
    assert vae.downsample_factor == 8 and vae.scale_factor == pytest.approx(0.18215)


def test_group_count() -> None:
    assert group_count(512) == 32 and group_count(128) == 32
    assert group_count(8) == 8 and group_count(48) == 24 and group_count(7) == 7
    with pytest.raises(ValueError):
        group_count(0)


def test_tiny_vae_shapes_sampling_and_scaling() -> None:
    vae = _tiny()
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x)
        assert isinstance(post, DiagonalGaussian)
        assert post.mean.shape == (2, 4, 8, 8) and post.logvar.shape == (2, 4, 8, 8)
        assert post.kl().shape == (2,) and torch.all(post.kl() >= 0)
        s1 = post.sample(torch.Generator().manual_seed(7))
        s2 = post.sample(torch.Generator().manual_seed(7))
        s3 = post.sample(torch.Generator().manual_seed(8))
        assert torch.equal(s1, s2) and not torch.allclose(s1, s3)
        assert not torch.allclose(s1, post.mode())
        z = vae.encode_to_latent(x, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(z, vae.scale_factor * s1)
        img = vae.decode(post.mode())
        assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()
        torch.testing.assert_close(vae.decode_from_latent(z), vae.decode(z / vae.scale_factor))
        recon, _ = vae(x, sample_posterior=False)
        torch.testing.assert_close(recon, img)
    assert vae.downsample_factor == 8 and vae.latent_channels == 4


def test_bad_inputs_name_the_problem() -> None:
    vae = _tiny()
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 60, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vae.encode(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        vae.decode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(embed_dim=4, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=8, ch_mult=[1, 2],
                      num_res_blocks=1, double_z=False)


def test_attention_levels_follow_original_layout() -> None:
    # attn_resolutions counts the *config* resolution: 64 -> levels at 64, 32, 16, 8; attention at 16 only.
    vae = _tiny(attn_resolutions=[16])
    keys = vae.state_dict().keys()
    assert any(k.startswith("encoder.down.2.attn.0.q.") for k in keys)
    assert any(k.startswith("decoder.up.2.attn.1.proj_out.") for k in keys)  # num_res_blocks + 1 in the decoder
    assert not any(k.startswith(("encoder.down.1.attn", "decoder.up.1.attn")) for k in keys)
    with torch.no_grad():
        assert vae.decode(vae.encode(torch.zeros(1, 3, 64, 64)).mode()).shape == (1, 3, 64, 64)


def test_attn_block_matches_explicit_softmax_reference() -> None:
    torch.manual_seed(3)
    c, h, w = 16, 5, 6
    block = AttnBlock(c)
    for p in block.parameters():  # non-trivial affine norm and projections
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        out = block(x)
        hn = torch.nn.functional.group_norm(x, group_count(c), block.norm.weight, block.norm.bias, eps=1e-6)
        q = block.q(hn).flatten(2).transpose(1, 2)  # (B, HW, C)
        k = block.k(hn).flatten(2)  # (B, C, HW)
        v = block.v(hn).flatten(2).transpose(1, 2)  # (B, HW, C)
        weights = torch.softmax(q @ k / math.sqrt(c), dim=-1)
        ref = x + block.proj_out((weights @ v).transpose(1, 2).reshape(2, c, h, w))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_diagonal_gaussian_clamps_logvar() -> None:
    params = torch.cat([torch.zeros(1, 2, 2, 2), torch.full((1, 2, 2, 2), 100.0)], dim=1)
    post = DiagonalGaussian(params)
    assert torch.all(post.logvar == 20.0) and torch.isfinite(post.sample()).all()
    with pytest.raises(ValueError, match="even channel count"):
        DiagonalGaussian(torch.zeros(1, 3, 2, 2))


def test_identity_first_stage_round_trip() -> None:
    ident = IdentityFirstStage(3)
    assert list(ident.parameters()) == [] and ident.downsample_factor == 1 and ident.scale_factor == 1.0
    x = torch.randn(2, 3, 16, 16)
    z = ident.encode_to_latent(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, x) and torch.equal(ident.decode_from_latent(z), x)
    post = ident.encode(x)
    assert torch.equal(post.sample(), x) and torch.equal(post.mode(), x) and torch.equal(post.kl(), torch.zeros(2))
    assert torch.equal(ident.decode(ident.encode(x).mode()), x)
    with pytest.raises(ValueError, match="IdentityFirstStage.encode"):
        ident.encode(torch.zeros(1, 4, 8, 8))
