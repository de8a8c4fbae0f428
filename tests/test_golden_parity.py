"""Parity with the original Siamese-Diffusion implementation (its deep-copy ``p_losses``, CPU fp32).

``../shared/reference/golden_tiny`` holds weights, inputs, the loss and every trainable gradient the released code
produced at a tiny geometry. Our copy-free loss must reproduce them under the original parameter names.
"""

from __future__ import annotations

import json

from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel

import pytest
import torch
from safetensors.torch import load_file

from cldm.controlnet import ControlConfig, ControlNet
from siamese.losses import LossWeights
from siamese.model import SiameseDiffusion
from siamese.schedules import SiameseRecipe


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _build(golden_dir):
    meta = json.loads((golden_dir / "late" / "meta.json").read_text())
    geo = meta["geometry"]
    cfg = UNetConfig(in_channels=geo["in_channels"], out_channels=geo["in_channels"],
                     model_channels=geo["model_channels"], attention_resolutions=tuple(geo["attention_resolutions"]),
                     num_res_blocks=geo["num_res_blocks"], channel_mult=tuple(geo["channel_mult"]),
                     num_heads=geo["num_heads"], context_dim=geo["context_dim"], legacy=geo["legacy"])
    unet = UNetModel(cfg)
    control = ControlNet(cfg, ControlConfig(hint_channels=geo["hint_channels"], hint_encoder=geo["hint_encoder"]))
    weights = load_file(golden_dir / "late" / "weights.safetensors")
    unet.load_state_dict(_strip(weights, "model.diffusion_model."), strict=True)
    control.load_state_dict(_strip(weights, "control_model."), strict=True)
    # sd_locked=False: ControlNet + UNet decoder are trainable.
    unet.requires_grad_(False)
    for p in unet.decoder_parameters().values():
        p.requires_grad_(True)
    sch = meta["schedule"]
    schedule = Schedule.from_config(sch["beta_schedule"], sch["timesteps"], sch["linear_start"], sch["linear_end"])
    method = SiameseDiffusion(unet, control, schedule, LossWeights(), SiameseRecipe(total_steps=meta["total_steps"]))
    return unet, control, method


def _run(golden_dir, case: str):
    unet, control, method = _build(golden_dir)
    meta = json.loads((golden_dir / case / "meta.json").read_text())
    x = load_file(golden_dir / case / "inputs.safetensors")
    assert x["t"].tolist() == meta["t"]
    out = method.training_loss(x["z0"], x["mask_hint"], x["image_hint"], x["context"], x["t"], x["noise"],
                               step=meta["step"])
    out.loss.backward()
    grads = {f"model.diffusion_model.{n}": p.grad for n, p in unet.named_parameters() if p.grad is not None}
    grads.update({f"control_model.{n}": p.grad for n, p in control.named_parameters() if p.grad is not None})
    return meta, out, grads


@pytest.mark.parametrize("case", ["late", "early"])
def test_loss_and_terms_match_original(golden_dir, case):
    meta, out, grads = _run(golden_dir, case)
    assert out.loss.item() == pytest.approx(meta["loss"], rel=1e-5)
    printed = meta["printed_term_means"]
    assert out.terms["loss_mask"].mean().item() == pytest.approx(printed["loss_simple_mask"], rel=1e-5)
    assert out.terms["loss_image"].mean().item() == pytest.approx(printed["loss_simple_image"], rel=1e-5)
    assert out.terms["loss_consistency"].mean().item() == pytest.approx(printed["loss_simple_mask_2_image"],
                                                                        rel=1e-4)
    assert out.aug_active == (case == "late")
    # The trainable set receives gradients, and nothing else does.
    assert len(grads) == meta["n_grads"]
    norms = meta["grad_norms"]
    norms = json.loads(norms.replace("'", '"')) if isinstance(norms, str) else norms
    assert set(norms) == set(grads)
    scale = max(norms.values())
    for name, ref in norms.items():
        # Gradients that are mathematically zero (a bias right before a per-channel GroupNorm) are float noise.
        assert grads[name].norm().item() == pytest.approx(ref, rel=1e-4, abs=1e-6 * scale), name


def test_every_gradient_matches_original(golden_dir):
    _, _, grads = _run(golden_dir, "late")
    ref = load_file(golden_dir / "late" / "grads.safetensors")
    assert set(ref) == set(grads)
    scale = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * scale, msg=name)
