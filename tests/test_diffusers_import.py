"""SD1.x bases as users have them: a diffusers folder (cldm/diffusers_import.py) and the single-file variants
(cldm.convert.load_sd_weights), through tool_add_control.py.

The parity checks are the point: TINY diffusers / transformers models (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel at the tiny geometry of configs/siamese_tiny.yaml with a 32-channel VAE, every weight random) are saved
with ``save_pretrained`` into a pipeline folder, converted, loaded strictly into this project's model, and both compute
the same ε prediction, VAE moments and decode, and text hidden states. The full SD1.5 geometry is checked on the meta
device: the renamed keys and shapes are diffusers' own. diffusers and transformers are test-only dependencies.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

from ldm.checkpoint import load_state_dict, load_strict, read_metadata, save_state_dict
from ldm.text_encoder import tokenize

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cldm.controlnet import ControlConfig
from cldm.convert import add_control, expected_state, fresh_control_weights, load_sd_weights
from cldm.diffusers_export import to_diffusers
from cldm.diffusers_import import (
    MODEL_INDEX,
    SDGeometry,
    _convert,
    from_diffusers,
    schedule_geometry,
    text_geometry,
    unet_geometry,
    unet_names,
    vae_geometry,
    vae_names,
)
from siamese.config import checkpoint_provenance, load_config
from siamese.factory import build_latent_diffusion, meta_model
from tools import add_control as add_control_tool

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "siamese_tiny.yaml"
SD15 = REPO / "configs" / "siamese_sd15.yaml"
OVERRIDES = ["model.first_stage.ddconfig.ch=32"]  # diffusers' VAE has one GroupNorm(32) rule: widths of 32k
CFG = load_config(TINY, OVERRIDES)
TOLERANCE = 1e-5
UNET_CONFIG = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
               "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 1,
               "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": 2,
               "cross_attention_dim": 32}
VAE_CONFIG = {"block_out_channels": [32, 64, 64, 64], "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "latent_channels": 4,
              "sample_size": 64, "scaling_factor": CFG.model.first_stage.scale_factor}
TEXT_CONFIG = {"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu"}
SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "skip_prk_steps": True}
INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
         "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "PNDMScheduler"]}


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (fan-in scaled, norm scales near 1): zero-initialised layers would hide mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    return module.eval()


def write_pipeline(folder: Path, unet: nn.Module, vae: nn.Module, text: nn.Module) -> Path:
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text)):
        model.save_pretrained(folder / name)
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    (folder / MODEL_INDEX).write_text(json.dumps(INDEX))
    return folder


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    unet = randomise(diffusers.UNet2DConditionModel(**UNET_CONFIG), 1)
    vae = randomise(diffusers.AutoencoderKL(**VAE_CONFIG), 2)
    text = randomise(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_CONFIG)), 3)
    folder = write_pipeline(tmp_path_factory.mktemp("diffusers") / "sd-tiny", unet, vae, text)
    weights = load_sd_weights(folder)
    model = build_latent_diffusion(CFG.model).eval()
    load_strict(model, weights.state)
    return {"folder": folder, "unet": unet, "vae": vae, "text": text, "weights": weights, "model": model}


def test_unet_predicts_the_same_noise(pipeline):
    gen = torch.Generator().manual_seed(5)
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 870])
    context = torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        ours = pipeline["model"].unet(x, t, context)
        theirs = pipeline["unet"](x, t, encoder_hidden_states=context).sample
    assert ours.abs().max() > 0.1 and (ours - theirs).abs().max() < TOLERANCE


def test_vae_encodes_and_decodes_the_same(pipeline):
    gen = torch.Generator().manual_seed(6)
    image, z = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, torch.randn(1, 4, 8, 8, generator=gen)
    vae = pipeline["model"].first_stage_model
    with torch.no_grad():
        ours, theirs = vae.encode(image), pipeline["vae"].encode(image).latent_dist
        decoded, reference = vae.decode(z), pipeline["vae"].decode(z).sample
    assert (ours.mean - theirs.mean).abs().max() < TOLERANCE and (ours.logvar - theirs.logvar).abs().max() < TOLERANCE
    assert decoded.abs().max() > 0.1 and (decoded - reference).abs().max() < TOLERANCE
    assert vae.scale_factor == pipeline["weights"].geometry.first_stage["scale_factor"]


def test_text_encoder_gives_the_same_hidden_states(pipeline):
    tokens = tokenize(["a photo of a polyp", ""], 77)
    with torch.no_grad():
        ours = pipeline["model"].cond_stage_model(tokens)
        theirs = pipeline["text"](tokens).last_hidden_state
    assert (ours - theirs).abs().max() < TOLERANCE


def test_folder_reports_its_layout_and_geometry(pipeline):
    weights = pipeline["weights"]
    assert weights.layout == "diffusers folder"
    assert [f.relative_to(pipeline["folder"]).as_posix() for f in weights.files] == [
        "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors"]
    model = CFG.model
    assert weights.geometry.mismatches(model.unet, asdict(model.first_stage), model.text_encoder,
                                       asdict(model.schedule)) == []
    assert weights.notes == ["read unet/diffusion_pytorch_model.safetensors, vae/diffusion_pytorch_model.safetensors, "
                             "text_encoder/model.safetensors (float32)"]
    # What shapes cannot show: 4 heads instead of 2 at each width.
    heads = replace(model.unet, num_heads=4)
    assert weights.geometry.mismatches(heads, asdict(model.first_stage), model.text_encoder, asdict(model.schedule)) \
        == [f"model.unet heads at width {w}: unet/config.json gives 2, the config has 4" for w in (32, 64)]
    sd15 = load_config(SD15).model
    problems = weights.geometry.mismatches(sd15.unet, asdict(sd15.first_stage), sd15.text_encoder,
                                           asdict(sd15.schedule))
    assert "model.unet.model_channels: unet/config.json gives 32, the config has 320" in problems


def test_encoder_names_agree_with_the_controlnet_export(pipeline):
    """Both ways: our UNet (imported) → control_model.* by add_control → cldm.diffusers_export gives exactly
    ControlNetModel.from_unet(diffusers UNet) for every tensor the ControlNet copies from the UNet."""
    cfg = load_config(TINY, [*OVERRIDES, "model.control.hint_encoder=hi"])
    model = meta_model(cfg.model)
    state, _ = add_control(pipeline["weights"].state, expected_state(model), fresh_control_weights(model, 0))
    exported = to_diffusers(state, cfg.model.unet, ControlConfig(hint_encoder="hi"))
    reference = diffusers.ControlNetModel.from_unet(pipeline["unet"]).state_dict()
    shared = [k for k in reference if k.startswith(("conv_in.", "time_embedding.", "down_blocks.", "mid_block."))]
    assert len(shared) > 50 and set(shared) <= set(exported)
    assert all(torch.equal(exported[k], reference[k]) for k in shared)


def test_full_size_sd15_names_are_diffusers_own():
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(cross_attention_dim=768)  # defaults: the SD1.5 UNet
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=(
            "DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
    sd15 = load_config(SD15).model
    ours = _convert(unet.state_dict(), *unet_names(sd15.unet), "sd15 unet", "UNet")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in unet_names(sd15.unet)[1].items()}
    first_stage = vae_geometry(dict(vae.config), "vae/config.json")
    assert first_stage["ddconfig"]["ch_mult"] == tuple(sd15.first_stage.ddconfig.ch_mult)
    state = {k: v.flatten(1) if ".attentions.0.to_" in k and k.endswith("weight") else v
             for k, v in vae.state_dict().items()}
    assert set(_convert(state, *vae_names(first_stage), "sd15 vae", "VAE")) == set(vae_names(first_stage)[1])
    # The runwayml/stable-diffusion-v1-5 config files describe configs/siamese_sd15.yaml exactly.
    text = text_geometry({**TEXT_CONFIG, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12}, "text_encoder/config.json")
    geometry = SDGeometry(unet_geometry(dict(unet.config), "unet/config.json"), first_stage, text,
                          schedule_geometry(SCHEDULER, "scheduler_config.json"))
    assert geometry.mismatches(sd15.unet, asdict(sd15.first_stage), sd15.text_encoder, asdict(sd15.schedule)) == []


def _reference_init(weights_state):
    model = meta_model(CFG.model)
    return add_control(weights_state, expected_state(model), fresh_control_weights(model, 0))[0]


def test_single_file_variants_give_the_same_init(pipeline, tmp_path):
    base = dict(pipeline["weights"].state)
    reference = _reference_init(dict(base))
    expected = expected_state(meta_model(CFG.model))
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    flat = {"model_ema." + k[len("model."):].replace(".", ""): k for k in unet}
    variants = {
        "emaonly.safetensors": {**{k: v for k, v in base.items() if k not in unet},
                                **{f: base[k] for f, k in flat.items()}, "model_ema.decay": torch.tensor(0.9999)},
        "wrapped.ckpt": {"state_dict": {"state_dict": base}, "global_step": 5},
        "legacy-text.safetensors": {k.replace("transformer.text_model.", "transformer."): v for k, v in base.items()},
        "linear-vae-attention.safetensors": {k: v[:, :, 0, 0] if ".attn_1." in k and v.dim() == 4 else v
                                             for k, v in base.items()},
    }
    for name, content in variants.items():
        path = tmp_path / name
        (torch.save(content, path) if name.endswith(".ckpt") else save_file(content, path))
        weights = load_sd_weights(path, expected=expected)
        assert weights.layout == f"single file ({path.suffix})" and weights.files == [path]
        state = _reference_init(weights.state)
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state), name
    # A full checkpoint with both copies: model.diffusion_model.* by default (as the original tool), EMA on request.
    shifted = {f: base[k] + 1 for f, k in flat.items()}
    save_file({**base, **shifted}, tmp_path / "full.safetensors")
    plain = load_sd_weights(tmp_path / "full.safetensors", expected=expected)
    assert torch.equal(plain.state[unet[0]], base[unet[0]]) and any("--ema" in n for n in plain.notes)
    ema = load_sd_weights(tmp_path / "full.safetensors", expected=expected, use_ema=True)
    assert torch.equal(ema.state[unet[0]], base[unet[0]] + 1)
    # fp16 (what *-fp16.safetensors releases hold): cast to the model's float32 by add_control.
    save_file({k: v.half() if v.is_floating_point() else v for k, v in base.items()}, tmp_path / "fp16.safetensors")
    state = _reference_init(load_sd_weights(tmp_path / "fp16.safetensors").state)
    assert all(state[k].dtype == reference[k].dtype for k in state)
    assert torch.equal(state[unet[0]], reference[unet[0]].half().float())


def test_fp16_folder_with_old_names_and_legacy_text_prefix(pipeline, tmp_path):
    """A folder as older hubs hold it: fp16 variants only, the VAE's pre-0.15 attention names, text_model.* keys."""
    folder = write_pipeline(tmp_path / "old", pipeline["unet"], pipeline["vae"], pipeline["text"])
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model")):
        state = load_file(folder / part / f"{stem}.safetensors")
        if part == "vae":
            old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
            for new, name in old.items():
                state = {k.replace(f"attentions.0.{new}.", f"attentions.0.{name}."): v for k, v in state.items()}
        if part == "text_encoder":
            state = {"text_model." + k: v for k, v in state.items()}
        save_file({k: v.half() for k, v in state.items()}, folder / part / f"{stem}.fp16.safetensors")
        (folder / part / f"{stem}.safetensors").unlink()
    weights = from_diffusers(folder)
    assert any("deprecated attention names" in n for n in weights.notes) and any("float16" in n for n in weights.notes)
    reference = load_sd_weights(pipeline["folder"]).state
    converted = load_sd_weights(folder).state
    assert converted.keys() == reference.keys()
    networks = [k for k in reference if "." in k]  # not the 13 schedule buffers (float32, from scheduler/)
    assert all(converted[k].dtype == torch.float16 and torch.equal(converted[k], reference[k].half()) for k in networks)


def _errors(argv: list[str], caplog) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = add_control_tool.main(argv)
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_tool_add_control_takes_a_diffusers_folder(pipeline, tmp_path, caplog):
    out = tmp_path / "init.safetensors"
    caplog.set_level(logging.INFO)
    assert add_control_tool.main([str(pipeline["folder"]), str(out), "--config", str(TINY), *OVERRIDES]) == 0
    assert "diffusers folder" in caplog.text
    init = load_file(out)
    reference = _reference_init(dict(pipeline["weights"].state))
    assert init.keys() == reference.keys() and all(torch.equal(init[k], reference[k]) for k in init)
    assert read_metadata(out)["base_layout"] == "diffusers folder"
    (record,) = checkpoint_provenance(out).records
    assert record.role == "external" and record.what == "diffusers folder sd-tiny"
    assert record.note.count("safetensors ") == 3 and "unet/diffusion_pytorch_model.safetensors" in record.note
    # Another --config geometry, or another latent scale factor: refused in one line, nothing written.
    for argv, needles in (([], ("model.unet.model_channels", "--config")),
                          (["model.first_stage.scale_factor=0.5"], ("add model.first_stage.scale_factor=",))):
        config = ["--config", str(SD15)] if not argv else ["--config", str(TINY), *OVERRIDES, *argv]
        rc, errors = _errors([str(pipeline["folder"]), str(tmp_path / "x.safetensors"), *config], caplog)
        assert rc != 0 and len(errors) == 1 and "\n" not in errors[0], errors
        assert all(n in errors[0] for n in needles), errors[0]
        assert not (tmp_path / "x.safetensors").exists()


def _copy(pipeline, tmp_path: Path, name: str) -> Path:
    return write_pipeline(tmp_path / name, pipeline["unet"], pipeline["vae"], pipeline["text"])


def test_folders_that_are_not_an_sd_base_are_refused_in_one_line(pipeline, tmp_path, caplog):
    folder = pipeline["folder"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "readme.txt").write_text("x")
    run = tmp_path / "step=10.ckpt"
    run.mkdir()
    (run / "latest").write_text("checkpoint")
    no_vae = _copy(pipeline, tmp_path, "no-vae")
    for path in (no_vae / "vae").iterdir():
        path.unlink()
    (no_vae / "vae").rmdir()
    no_weights = _copy(pipeline, tmp_path, "no-weights")
    (no_weights / "text_encoder" / "model.safetensors").unlink()
    v_pred = _copy(pipeline, tmp_path, "v-pred")
    (v_pred / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER,
                                                                           "prediction_type": "v_prediction"}))
    sdxl = _copy(pipeline, tmp_path, "sdxl-unet")
    unet_config = json.loads((sdxl / "unet" / "config.json").read_text())
    (sdxl / "unet" / "config.json").write_text(json.dumps({**unet_config, "addition_embed_type": "text_time"}))
    missing_key = _copy(pipeline, tmp_path, "missing-key")
    state = load_file(missing_key / "unet" / "diffusion_pytorch_model.safetensors")
    del state["conv_out.weight"]
    save_file(state, missing_key / "unet" / "diffusion_pytorch_model.safetensors")
    cases = [
        (other, ("readme.txt", "model_index.json", "zero_to_fp32")),
        (run, ("ZeRO", "zero_to_fp32.py")),
        (no_vae, ("no-vae", "without its vae/ part")),
        (no_weights, ("text_encoder", "no weights", "model.safetensors")),
        (v_pred, ("scheduler_config.json", "prediction_type='v_prediction'")),
        (sdxl, ("unet/config.json", "addition_embed_type='text_time'")),
        (missing_key, ("unet/diffusion_pytorch_model.safetensors", "1 missing", "conv_out.weight")),
        (folder / "unet", ("one part of a diffusers folder", "model_index.json")),
        (folder / "unet" / "diffusion_pytorch_model.safetensors", ("not a whole Stable Diffusion", MODEL_INDEX)),
    ]
    out = tmp_path / "out.safetensors"
    for path, needles in cases:
        rc, errors = _errors([str(path), str(out), "--config", str(TINY), *OVERRIDES], caplog)
        assert rc != 0 and len(errors) == 1 and "\n" not in errors[0], (path, errors)
        assert all(n in errors[0] for n in needles), errors[0]
        assert not out.exists()


def test_ema_only_file_without_the_model_keys_is_refused(pipeline, tmp_path):
    base = pipeline["weights"].state
    ema = {("model_ema." + k[len("model."):].replace(".", "") if k.startswith("model.diffusion_model.") else k): v
           for k, v in base.items()}
    save_state_dict(ema, tmp_path / "ema.safetensors")
    with pytest.raises(ValueError, match="only as its EMA copy"):
        load_sd_weights(tmp_path / "ema.safetensors")
    small = load_state_dict(tmp_path / "ema.safetensors")
    small.pop(next(k for k in small if k.startswith("model_ema.diffusion_modelout")))
    save_state_dict(small, tmp_path / "ema-short.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 of the model's \d+ UNet tensors"):
        load_sd_weights(tmp_path / "ema-short.safetensors", expected=expected_state(meta_model(CFG.model)))


def test_pretrain_starts_from_a_diffusers_folder(pipeline):
    """``tools.pretrain train.init_ckpt=FOLDER`` reads a diffusers pipeline as tool_add_control.py does, and the
    base model has every key it brings (pretrain_unet refuses unknown ones)."""
    from dataclasses import replace

    from tools import pretrain as pretrain_tool

    cfg = replace(CFG, train=replace(CFG.train, init_ckpt=str(pipeline["folder"])))
    state = pretrain_tool._init_weights(cfg, unsafe_pickle=False)
    reference = pipeline["weights"].state
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert not set(state) - set(build_latent_diffusion(CFG.model).state_dict())
