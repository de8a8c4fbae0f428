"""Copy-free Siamese loss (``SiameseDiffusion.training_loss``) against a deep-copy reference of the released method.

The reference below does, step by step, what the released ``p_losses`` does: it deep-copies the ControlNet and the
UNet, takes ``sg(c_m)`` from the copied ControlNet under no-grad, runs the image branch through the copied UNet (so
L_mix reaches ``c_i`` but never the live UNet), and evaluates L_aug on the whole batch with the ``t ≤ 200`` gate as a
multiplier. Every parameter is randomised first: at initialisation the zero convolutions make most gradients
trivially zero and would hide a wrong gradient path. Geometry: the tiny one of ``test_golden_parity.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ldm.schedule import Schedule
from ldm.unet import UNetConfig, UNetModel

import pytest
import torch
from torch import Tensor, nn

from cldm.controlnet import ControlConfig, ControlNet
from siamese.losses import TERMS, LossWeights
from siamese.model import SiameseDiffusion
from siamese.reference import deep_copy_loss
from siamese.schedules import SiameseRecipe

CFG = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=2,
                 context_dim=32)
TOTAL = 300
LATE, EARLY = 250, 50  # past / before S · 1/3
T_MIXED = [50, 600, 150]  # two samples inside the L_aug gate (t ≤ 200), one outside


# -- set-up --------------------------------------------------------------------------------------------------------
def randomise(module: nn.Module, std: float = 0.05, skip: Sequence[str] = ()) -> None:
    """Perturb every parameter (zero-initialised ones included) so that no gradient is zero by construction."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.startswith(tuple(skip)):
                p.add_(std * torch.randn_like(p))


def build(only_mid_control: bool = False, seed: int = 0) -> tuple[UNetModel, ControlNet]:
    torch.manual_seed(seed)
    unet = UNetModel(CFG)
    control = ControlNet(CFG, ControlConfig(only_mid_control=only_mid_control))
    randomise(unet)
    randomise(control)
    # sd_locked=False: ControlNet + UNet decoder trainable; UNet time embedding, encoder and middle block frozen.
    unet.requires_grad_(False)
    for p in unet.decoder_parameters().values():
        p.requires_grad_(True)
    return unet, control


def make_inputs(t: Sequence[int], seed: int = 1) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = len(t)
    mask = (torch.rand(b, 1, 64, 64, generator=g) > 0.5).float()
    return {
        "z0": torch.randn(b, 4, 8, 8, generator=g),
        "mask_hint": mask.expand(b, 3, 64, 64).contiguous(),
        "image_hint": torch.rand(b, 3, 64, 64, generator=g),
        "context": torch.randn(b, 7, 32, generator=g),
        "t": torch.tensor(t, dtype=torch.long),
        "noise": torch.randn(b, 4, 8, 8, generator=g),
        "aug_noise": torch.randn(b, 4, 8, 8, generator=g),
    }


SCHEDULE = Schedule.from_config()


# -- the reference: the released formulation, deep copies and all (siamese/reference.py) ---------------------------
def reference_loss(unet: UNetModel, control: ControlNet, weights: LossWeights, recipe: SiameseRecipe, step: int,
                   **x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    return deep_copy_loss(unet, control, SCHEDULE, weights, recipe, step, **x)


# -- running both --------------------------------------------------------------------------------------------------
def grads_of(*modules: nn.Module) -> dict[str, Tensor | None]:
    return {f"{i}.{n}": (None if p.grad is None else p.grad.clone())
            for i, m in enumerate(modules) for n, p in m.named_parameters()}


def clear_grads(*modules: nn.Module) -> None:
    for m in modules:
        for p in m.parameters():
            p.grad = None


def run_copy_free(unet, control, weights, recipe, step, x):
    clear_grads(unet, control)
    method = SiameseDiffusion(unet, control, SCHEDULE, weights, recipe)
    out = method.training_loss(x["z0"], x["mask_hint"], x["image_hint"], x["context"], x["t"], x["noise"], step,
                               aug_noise=x["aug_noise"])
    out.loss.backward()
    return out.loss.detach(), {k: v.detach() for k, v in out.terms.items()}, grads_of(unet, control)


def run_reference(unet, control, weights, recipe, step, x):
    clear_grads(unet, control)
    loss, terms = reference_loss(unet, control, weights, recipe, step, **x)
    loss.backward()
    return loss.detach(), {k: v.detach() for k, v in terms.items()}, grads_of(unet, control)


def assert_same_grads(got: dict[str, Tensor | None], ref: dict[str, Tensor | None]) -> None:
    """Same set of parameters with a gradient; every gradient close.

    The absolute tolerance is scaled by the largest gradient: the copy-free form batches the two ControlNet passes
    (2B) and runs L_aug on the gated samples only, so sums over the batch are ordered differently, and entries that
    are near-cancelling sums come out ~1e-6 · max|g| apart. A wrong gradient path differs by O(max|g|).
    """
    assert [k for k, g in got.items() if g is None] == [k for k, g in ref.items() if g is None]
    scale = max(g.abs().max().item() for g in ref.values() if g is not None)
    assert scale > 0
    for name, g in ref.items():
        if g is not None:
            torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


def assert_parity(weights: LossWeights, recipe: SiameseRecipe, step: int, t: Sequence[int],
                  only_mid_control: bool = False, checkpointing: bool = False) -> dict[str, Tensor]:
    unet, control = build(only_mid_control)
    x = make_inputs(t)
    ref_loss, ref_terms, ref_grads = run_reference(unet, control, weights, recipe, step, x)
    unet.set_gradient_checkpointing(checkpointing)
    control.set_gradient_checkpointing(checkpointing)
    loss, terms, grads = run_copy_free(unet, control, weights, recipe, step, x)
    for name in TERMS:
        # A zero-weight term may be skipped (reported as zeros) by the copy-free form; the reference always has it.
        if weights.of(name) > 0 or terms[name].any():
            torch.testing.assert_close(terms[name], ref_terms[name], rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert_same_grads(grads, ref_grads)
    return ref_terms


# -- a. all four terms --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("aug_noise", ["same", "fresh"])
def test_all_terms_match_reference(aug_noise):
    recipe = SiameseRecipe(total_steps=TOTAL, aug_noise=aug_noise)
    terms = assert_parity(LossWeights(), recipe, LATE, T_MIXED)
    # Every term is non-trivial, and L_aug is exactly 0 outside its sample gate.
    for name in TERMS:
        assert terms[name].max() > 1e-4, name
    gate = torch.tensor(T_MIXED) <= 200
    assert bool((terms["loss_aug"][~gate] == 0).all()) and bool((terms["loss_aug"][gate] > 0).all())


def test_checkpointing_matches_reference():
    assert_parity(LossWeights(), SiameseRecipe(total_steps=TOTAL, aug_noise="fresh"), LATE, T_MIXED,
                  checkpointing=True)


def test_checkpointing_gives_identical_gradients():
    recipe, x = SiameseRecipe(total_steps=TOTAL), make_inputs(T_MIXED)
    unet, control = build()
    assert unet.training and control.training
    loss, terms, grads = run_copy_free(unet, control, LossWeights(), recipe, LATE, x)
    unet.set_gradient_checkpointing(True)
    control.set_gradient_checkpointing(True)
    loss_ck, terms_ck, grads_ck = run_copy_free(unet, control, LossWeights(), recipe, LATE, x)
    assert torch.equal(loss, loss_ck)
    assert [k for k, g in grads.items() if g is None] == [k for k, g in grads_ck.items() if g is None]
    for name, g in grads.items():
        if g is not None:
            torch.testing.assert_close(grads_ck[name], g, rtol=0, atol=0, msg=name)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs."""
    total = [0]

    def pack(t: Tensor) -> Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_checkpointing_covers_the_hint_encoder():
    _, control = build()
    x = make_inputs(T_MIXED)
    hint, t = x["mask_hint"], torch.tensor(T_MIXED)
    z, ctx = x["z0"], x["context"]
    hint_alone = _saved_bytes(lambda: control.input_hint_block(hint))
    plain = _saved_bytes(lambda: control(z, hint, t, ctx))
    control.set_gradient_checkpointing(True)
    checkpointed = _saved_bytes(lambda: control(z, hint, t, ctx))
    # The hint encoder's activations (the largest share at full hint resolution) are no longer kept.
    assert plain > hint_alone > checkpointed


# -- b. only_mid_control ------------------------------------------------------------------------------------------
def test_only_mid_control_matches_reference():
    assert_parity(LossWeights(), SiameseRecipe(total_steps=TOTAL), LATE, T_MIXED, only_mid_control=True)


# -- c. the L_aug gates -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("step", "t"), [(EARLY, T_MIXED), (LATE, [300, 999, 201]), (LATE, [0, 200, 120])],
                         ids=["early-step", "no-t-in-gate", "all-t-in-gate"])
def test_aug_gates_match_reference(step, t):
    terms = assert_parity(LossWeights(), SiameseRecipe(total_steps=TOTAL), step, t)
    in_gate = step > TOTAL / 3 and max(t) <= 200
    assert bool((terms["loss_aug"] > 0).all()) if in_gate else bool((terms["loss_aug"] == 0).all())


# -- d. weights ---------------------------------------------------------------------------------------------------
def test_mask_only_is_plain_controlnet_training():
    unet, control = build()
    x = make_inputs(T_MIXED)
    batch_sizes: list[int] = []
    control.register_forward_hook(lambda _m, args, _out: batch_sizes.append(args[0].shape[0]))
    loss, _, grads = run_copy_free(unet, control, LossWeights(1, 0, 0, 0), SiameseRecipe(total_steps=TOTAL), LATE,
                                   x)
    assert batch_sizes == [len(T_MIXED)]  # one ControlNet pass on the mask hint; no image branch, no L_aug

    clear_grads(unet, control)
    z_t = SCHEDULE.q_sample(x["z0"], x["t"], x["noise"])
    eps = unet(z_t, x["t"], x["context"], control(z_t, x["mask_hint"], x["t"], x["context"]))
    plain = (eps - x["noise"]).pow(2).flatten(1).mean(1).mean()
    plain.backward()
    torch.testing.assert_close(loss, plain.detach(), rtol=1e-6, atol=0)
    assert_same_grads(grads, grads_of(unet, control))


@pytest.mark.parametrize("zero", ["mask", "image", "consistency", "aug"])
def test_each_weight_zero_matches_reference(zero):
    weights = LossWeights(**{zero: 0.0})
    assert_parity(weights, SiameseRecipe(total_steps=TOTAL), LATE, T_MIXED)


def test_non_unit_weights_match_reference():
    recipe = SiameseRecipe(total_steps=TOTAL, mask_control_weight=0.7, image_control_weight=0.5)
    assert_parity(LossWeights(0.5, 2.0, 1.5, 3.0), recipe, LATE, T_MIXED)


# -- e. gradient flow ---------------------------------------------------------------------------------------------
def _is_decoder(name: str) -> bool:
    return name.startswith(("0.output_blocks.", "0.out."))


def test_unet_encoder_is_never_trained():
    unet, control = build()
    unet.requires_grad_(True)  # even when asked to, the encoder runs without autograd
    _, _, grads = run_copy_free(unet, control, LossWeights(), SiameseRecipe(total_steps=TOTAL), LATE,
                                make_inputs(T_MIXED))
    frozen = [n for n in grads if n.startswith(("0.time_embed.", "0.input_blocks.", "0.middle_block."))]
    assert frozen and all(grads[n] is None for n in frozen)
    assert all(grads[n] is not None and grads[n].abs().max() > 0 for n in grads if _is_decoder(n))


def test_image_loss_never_reaches_the_unet():
    unet, control = build()
    _, _, grads = run_copy_free(unet, control, LossWeights(0, 1, 0, 0), SiameseRecipe(total_steps=TOTAL), LATE,
                                make_inputs(T_MIXED))
    assert all(grads[n] is None or not grads[n].any() for n in grads if _is_decoder(n))
    control_grads = [g for n, g in grads.items() if n.startswith("1.")]
    assert all(g is not None for g in control_grads) and any(g.abs().max() > 0 for g in control_grads)


def test_consistency_loss_reaches_the_decoder():
    unet, control = build()
    _, _, grads = run_copy_free(unet, control, LossWeights(0, 0, 1, 0), SiameseRecipe(total_steps=TOTAL), LATE,
                                make_inputs(T_MIXED))
    assert all(grads[n] is not None and grads[n].abs().max() > 0 for n in grads if _is_decoder(n))


# -- f. zero-initialised control ----------------------------------------------------------------------------------
def test_fresh_controlnet_leaves_the_unet_unchanged():
    torch.manual_seed(0)
    unet = UNetModel(CFG)
    control = ControlNet(CFG, ControlConfig())
    randomise(unet)
    # Everything but the zero convolutions random, so only they can make the residuals vanish.
    randomise(control, skip=("zero_convs.", "middle_block_out."))
    x = make_inputs(T_MIXED)
    z_t = SCHEDULE.q_sample(x["z0"], x["t"], x["noise"])
    with torch.no_grad():
        residuals = control(z_t, x["mask_hint"], x["t"], x["context"])
        assert all(not r.any() for r in residuals)
        controlled = unet(z_t, x["t"], x["context"], residuals)
        plain = unet(z_t, x["t"], x["context"], None)
    assert plain.abs().max() > 0
    assert torch.equal(controlled, plain)
