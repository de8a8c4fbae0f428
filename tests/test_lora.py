"""LoRA (peft) as the alternative to full decoder fine-tuning: trainable sets, Siamese stop-gradient parity with the
adapters on, folding into plain weights, and a real ZeRO-2 run → zero_to_fp32 → merge → a plain inference file."""

from __future__ import annotations

import logging
import shutil

from ldm.checkpoint import load_state_dict, read_metadata, save_state_dict

import pytest
import torch
from test_siamese_parity import (
    CFG,
    LATE,
    TOTAL,
    assert_same_grads,
    build,
    make_inputs,
    randomise,
    run_copy_free,
    run_reference,
)
from test_train import TINY, _overrides

from cldm.controlnet import ControlConfig, ControlNet
from cldm.lora import LoraSettings, add_lora, configure_trainable, fold_lora, is_lora_name, plain_names
from siamese.config import ConfigError, load_config
from siamese.factory import build_model, load_weights, meta_model
from siamese.losses import LossWeights
from siamese.schedules import SiameseRecipe
from tools import merge_control as merge_tool
from tools import train as train_tool
from tools import zero_to_fp32 as zero_tool

pytest.importorskip("peft")

ALL = LoraSettings(enabled=True, rank=4, alpha=8.0, targets=("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                             "ff.net.2", "proj_in", "proj_out", "in_layers.2",
                                                             "out_layers.3", "skip_connection"))


def _eps(unet, control, x):
    control_out = control(x["z0"], x["mask_hint"], x["t"], x["context"])
    return unet(x["z0"], x["t"], x["context"], control_out)


def test_adapters_start_as_the_base_model_and_train_only_what_they_should():
    unet, control = build()
    x = make_inputs([50, 600])
    before = _eps(unet, control, x)
    add_lora(unet, control, ALL)
    torch.testing.assert_close(_eps(unet, control, x), before, rtol=0, atol=0)  # B = 0
    configure_trainable(unet, control, ALL)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(is_lora_name(n) and n.startswith("output_blocks.") for n in trainable)
    assert any(".in_layers.2.lora_A." in n for n in trainable)  # convolutions are wrapped too
    assert all(p.requires_grad for p in control.parameters())  # the ControlNet trains in full

    unet, control = build()
    both = LoraSettings(enabled=True, rank=2, control=True)
    add_lora(unet, control, both)
    configure_trainable(unet, control, both)
    names = {n for n, p in control.named_parameters() if p.requires_grad}
    assert any(n.startswith("input_blocks.") and is_lora_name(n) for n in names)
    assert {n.split(".")[0] for n in names if not is_lora_name(n)} == {"zero_convs", "middle_block_out",
                                                                        "input_hint_block"}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_siamese_stop_gradients_with_lora_match_the_deep_copy_reference(checkpointing):
    """The stopped UNet must use the *adapted* weights, detached: L_mix reaches the ControlNet, never the adapters."""
    unet, control = build()
    add_lora(unet, control, ALL)
    randomise(unet)  # B ≠ 0: the adapters change the function, and every gradient path is non-trivial
    configure_trainable(unet, control, ALL)
    weights, recipe = LossWeights(), SiameseRecipe(total_steps=TOTAL)
    x = make_inputs([50, 600, 150])
    ref_loss, _, ref_grads = run_reference(unet, control, weights, recipe, LATE, x)
    unet.set_gradient_checkpointing(checkpointing)
    control.set_gradient_checkpointing(checkpointing)
    loss, _, grads = run_copy_free(unet, control, weights, recipe, LATE, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert_same_grads(grads, ref_grads)
    lora_grads = [g for k, g in grads.items() if is_lora_name(k) and g is not None]
    assert lora_grads and any(g.abs().max() > 0 for g in lora_grads)

    # Without the stop-gradient the image branch would also reach the adapters: their gradient must differ from
    # a run in which L_mix is the only term (which must leave them at exactly zero).
    only_mix = LossWeights(mask=0.0, image=1.0, consistency=0.0, aug=0.0)
    _, _, mix_grads = run_copy_free(unet, control, only_mix, recipe, LATE, x)
    assert all(g is None or not g.any() for k, g in mix_grads.items() if k.startswith("0."))
    assert any(g is not None and g.any() for k, g in mix_grads.items() if k.startswith("1."))


def test_fold_lora_gives_the_adapted_model_as_plain_weights():
    torch.manual_seed(0)
    unet, control = build()
    plain_unet, _ = build()
    add_lora(unet, control, ALL)
    randomise(unet)
    with torch.no_grad():
        for p_dst, (_name, p_src) in zip(plain_unet.parameters(),
                                        ((n, p) for n, p in unet.named_parameters() if not is_lora_name(n))):
            p_dst.copy_(p_src)
    state = plain_names(unet.state_dict())
    assert any(k.endswith(".lora_A.weight") for k in state)
    folded = fold_lora(state, {}, ALL.scaling)
    assert not any(is_lora_name(k) for k in folded)
    plain_unet.load_state_dict(folded, strict=True)
    x = make_inputs([50, 600])
    ctl = control(x["z0"], x["mask_hint"], x["t"], x["context"])
    torch.testing.assert_close(plain_unet(x["z0"], x["t"], x["context"], ctl),
                               unet(x["z0"], x["t"], x["context"], ctl), rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="lora_A and lora_B must both be present"):
        fold_lora({"a.lora_A.weight": torch.zeros(2, 3)}, {}, 1.0)
    with pytest.raises(ValueError, match="base weight a.weight is in neither"):
        fold_lora({"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(4, 2)}, {}, 1.0)


def test_config_rules_for_lora():
    with pytest.raises(ConfigError, match="method.sd_locked: false"):
        load_config(TINY, ["method.lora.enabled=true", "method.sd_locked=true"])
    with pytest.raises(ConfigError, match=r"method.lora.rank must be >= 1"):
        load_config(TINY, ["method.lora.enabled=true", "method.lora.rank=0"])
    with pytest.raises(ConfigError, match=r"\['to_x'\] are not among"):
        load_config(TINY, ["method.lora.enabled=true", "method.lora.targets=[to_x]"])
    unet = ControlNet(CFG, ControlConfig())  # a module without a decoder: no layer matches
    with pytest.raises(ValueError, match="no layer of ControlNet matches"):
        add_lora(unet, None, LoraSettings(enabled=True))


def test_lora_training_under_zero2_merges_into_a_plain_checkpoint(init_ckpt, tmp_path, caplog):
    # A base whose zero-initialised output layers are not zero (as in any trained model): otherwise the decoder's
    # adapters get no gradient in the first steps.
    torch.manual_seed(0)
    base = load_state_dict(init_ckpt)
    base = {k: v + 0.05 * torch.randn_like(v) if k.startswith("model.diffusion_model.") else v
            for k, v in base.items()}
    metadata = read_metadata(init_ckpt)
    init_ckpt = tmp_path / "init.safetensors"
    save_state_dict(base, init_ckpt, metadata=metadata)
    out = tmp_path / "run"
    lora = {"train.init_ckpt": init_ckpt, "method.lora.enabled": "true", "method.lora.rank": 4,
            "method.lora.alpha": 4.0, "train.lr": 0.05}
    cfg = load_config(TINY, _overrides(out, steps=4, **lora))
    uninterrupted = train_tool.train(cfg).lightning_module.net.state_dict()
    caplog.set_level(logging.INFO)
    assert zero_tool.main([str(out), str(tmp_path / "t.safetensors")]) == 0
    trained = load_state_dict(tmp_path / "t.safetensors")
    lora_keys = [k for k in trained if is_lora_name(k)]
    assert lora_keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in lora_keys)
    assert not any(".base_layer." in k or ".default." in k for k in trained)
    assert any(trained[k].any() for k in lora_keys if k.endswith(".lora_B.weight"))  # B moved away from zero
    # The checkpoint holds only what is trained: no frozen weight (UNet encoder, decoder base, VAE, text encoder).
    names = set(meta_model(cfg.model).configure_trainable(cfg.method.sd_locked))
    assert not any(k.startswith(("first_stage_model.", "cond_stage_model.")) for k in trained)
    assert "model.diffusion_model.input_blocks.0.0.weight" not in trained
    assert {k for k in trained if k.startswith("model.diffusion_model.")} <= set(lora_keys)
    assert {k for k in names if k.startswith("control_model.")} <= set(trained)

    # Resume (the frozen base comes from train.init_ckpt again): bit for bit the uninterrupted run.
    run = tmp_path / "resumed"
    shutil.copytree(out, run)
    shutil.rmtree(run / "checkpoints" / "step=4.ckpt")
    resumed = train_tool.train(load_config(TINY, _overrides(run, steps=4, **lora)), resume="latest")
    assert resumed.global_step == 4
    for key, value in resumed.lightning_module.net.state_dict().items():
        assert torch.equal(value, uninterrupted[key]), key

    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(tmp_path / "t.safetensors"),
                            "--out", str(tmp_path / "m.safetensors")]) == 0
    assert "folded" in caplog.text and "LoRA adapters" in caplog.text
    model = build_model(cfg.model)
    load_weights(model, tmp_path / "m.safetensors")  # strict: a plain checkpoint, no adapter keys
    init, merged = load_state_dict(init_ckpt), load_state_dict(tmp_path / "m.safetensors")
    changed = {k for k in init if not torch.equal(init[k], merged[k])}
    wrapped = {k.replace(".lora_A.weight", ".weight") for k in lora_keys if k.endswith(".lora_A.weight")}
    unet_changed = {k for k in changed if k.startswith("model.diffusion_model.")}
    # The decoder changed exactly where adapters were (their biases and the unwrapped layers stayed the base's).
    assert unet_changed and unet_changed <= wrapped
    assert any(k.startswith("control_model.") for k in changed)  # the ControlNet trained in full
    assert changed <= set(meta_model(cfg.model).configure_trainable(cfg.method.sd_locked))

    # A trained file with adapters needs the run's config: an init-only config (lora disabled) is refused.
    plain_cfg = tmp_path / "plain.safetensors"
    save_state_dict(trained, plain_cfg, metadata={})
    assert merge_tool.main(["--base", str(init_ckpt), "--trained", str(plain_cfg), "--out",
                            str(tmp_path / "m2.safetensors"), "--config", str(TINY)]) == 2
    assert "method.lora disabled" in caplog.text
