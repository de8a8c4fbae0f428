"""Export of a plain (HI) ControlNet to diffusers' ``ControlNetModel``: cldm/diffusers_export.py and its CLI.

The parity check is the point: a ControlNet of this project with every weight random (zero convolutions included,
else all residuals are 0 and any mapping passes) is exported, loaded into diffusers with ``strict=True``, and both
compute the control residuals for the same latent, timesteps, text context and hint. The full-size geometries
(SD1.5, and SD2's per-level head counts) are checked on the meta device: keys and shapes equal diffusers'.
diffusers is a test-only dependency (reference implementation), hence ``importorskip``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from ldm.checkpoint import read_metadata, save_state_dict
from ldm.unet import UNetConfig

import pytest
import torch
from torch import nn

from cldm.controlnet import ControlConfig, ControlNet
from cldm.diffusers_export import CONFIG_NAME, WEIGHTS_NAME, diffusers_config, to_diffusers
from siamese.config import checkpoint_metadata, load_config, save_config
from siamese.factory import build_model
from tools import export_diffusers

diffusers = pytest.importorskip("diffusers")

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
CONTROLNET_TINY = REPO / "configs" / "controlnet_tiny.yaml"
HI = ControlConfig(hint_encoder="hi")
TINY_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                       num_heads=2, context_dim=32)
# SD2-style heads (num_head_channels: a different head count per level), linear projections, depth 2, two
# resolutions with attention, two res blocks per level, a one-channel hint.
SD2_STYLE_UNET = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                            num_heads=-1, num_head_channels=16, use_linear_in_transformer=True, transformer_depth=2,
                            context_dim=24)
TOLERANCE = 1e-5


def randomise(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter random: fan-in scaled weights, norm scales near 1, small biases (zero convs included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if param.dim() > 1:
                param.copy_(noise / param[0].numel() ** 0.5)
            else:
                param.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    return module.eval()


def max_residual_diff(net: ControlNet, theirs: nn.Module, hint_channels: int = 3) -> float:
    """Max |ours − diffusers| over all residuals, for a batch of 2 latents at 8×8 with a 64×64 hint in [0, 1]."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, net.unet_config.in_channels, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 5, net.unet_config.context_dim, generator=gen)
    hint = torch.rand(2, hint_channels, 64, 64, generator=gen)
    with torch.no_grad():
        ours = net(x, hint, t, context)
        down, mid = theirs(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    assert len(ours) == len(down) + 1 == net.num_residuals
    for a, b in zip(ours, [*down, mid]):
        assert a.shape == b.shape and a.abs().max() > 1e-2  # non-trivial residuals: the comparison means something
    return max((a - b).abs().max().item() for a, b in zip(ours, [*down, mid]))


@pytest.mark.parametrize("unet, control", [(TINY_UNET, HI), (SD2_STYLE_UNET, replace(HI, hint_channels=1))],
                         ids=["sd15-style", "sd2-style"])
def test_residuals_match_diffusers(unet: UNetConfig, control: ControlConfig, request: pytest.FixtureRequest) -> None:
    net = randomise(ControlNet(unet, control), seed=1)
    theirs = diffusers.ControlNetModel.from_config(diffusers_config(unet, control)).eval()
    theirs.load_state_dict(to_diffusers(net.state_dict(), unet, control, prefix=""), strict=True)
    diff = max_residual_diff(net, theirs, control.hint_channels)
    logger.info("max abs residual difference vs diffusers, %s: %.3g", request.node.callspec.id, diff)
    assert diff < TOLERANCE


SD15_CONFIG = {"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
               "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "layers_per_block": 2,
               "conditioning_embedding_out_channels": [16, 32, 96, 256], "conditioning_channels": 3,
               "use_linear_projection": False, "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0,
               "in_channels": 4}  # the values of the released lllyasviel/sd-controlnet-* config.json files


@pytest.mark.parametrize("unet, expected", [
    (UNetConfig(), SD15_CONFIG),
    (UNetConfig(num_heads=-1, num_head_channels=64, use_linear_in_transformer=True, context_dim=1024),
     {"attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True, "cross_attention_dim": 1024}),
], ids=["sd15", "sd2"])
def test_full_size_keys_and_shapes_are_diffusers(unet: UNetConfig, expected: dict) -> None:
    with torch.device("meta"):
        net = ControlNet(unet, HI)
    mapped = to_diffusers(net.state_dict(), unet, HI, prefix="")
    config = diffusers_config(unet, HI)
    assert {k: config[k] for k in expected} == expected
    with torch.device("meta"):
        theirs = diffusers.ControlNetModel.from_config(config)
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("unet, control, needles", [
    (TINY_UNET, ControlConfig(hint_encoder="dhi"), ("hint_encoder=dhi", "DenseHintEncoder", "controlnet_cond_embedding",
                                                    "input_hint_block")),
    (TINY_UNET, replace(HI, only_mid_control=True), ("only_mid_control",)),
    (TINY_UNET, replace(HI, control_scale=0.5), ("control_scale=0.5", "controlnet_conditioning_scale=0.5")),
    (replace(TINY_UNET, model_channels=16), HI, ("GroupNorm(16)", "norm_num_groups=32")),
    (replace(TINY_UNET, model_channels=48), HI, ("GroupNorm(24)",)),
    (replace(TINY_UNET, channel_mult=(2, 2)), HI, ("channel_mult[0]=2",)),
    (replace(TINY_UNET, num_heads=3), HI, ("3 heads", "num_heads")),
    (replace(TINY_UNET, conv_resample=False), HI, ("conv_resample",)),
], ids=["dhi", "only_mid", "scale", "groups16", "groups24", "mult", "heads", "avgpool"])
def test_inexpressible_settings_are_refused_in_one_line(unet: UNetConfig, control: ControlConfig,
                                                        needles: tuple[str, ...]) -> None:
    for call in (lambda: diffusers_config(unet, control), lambda: to_diffusers({}, unet, control)):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and all(n in message for n in needles), message


def test_weights_that_do_not_fit_the_config_are_refused() -> None:
    with torch.device("meta"):
        dhi = ControlNet(TINY_UNET, ControlConfig(hint_encoder="dhi")).state_dict()
        other = ControlNet(replace(TINY_UNET, num_res_blocks=2), HI).state_dict()
    with pytest.raises(ValueError, match=r"DHI hint encoder .*DenseHintEncoder"):
        to_diffusers(dhi, TINY_UNET, HI, prefix="")
    with pytest.raises(ValueError, match=r"does not match the ControlNet of this config.*unexpected"):
        to_diffusers(other, TINY_UNET, HI, prefix="")
    with pytest.raises(ValueError, match=r"no control_model\.\* keys"):
        to_diffusers(other, TINY_UNET, HI)


# --- the CLI --------------------------------------------------------------------------------------------------------

def _merged(path: Path, hint_encoder: str) -> tuple[Path, ControlNet]:
    """A merged-style tiny checkpoint (the full model, config in the metadata) with a random ControlNet."""
    cfg = load_config(CONTROLNET_TINY, [f"model.control.hint_encoder={hint_encoder}"])
    model = build_model(cfg.model)
    randomise(model.control, seed=2)
    save_state_dict(model.state_dict(), path, metadata=checkpoint_metadata(cfg, "merged"))
    return path, model.control


@pytest.fixture(scope="module")
def merged_hi(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ControlNet]:
    return _merged(tmp_path_factory.mktemp("export") / "merged.safetensors", "hi")


def _run(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, list[str]]:
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        rc = export_diffusers.main(argv)
    return rc, [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_cli_folder_loads_with_from_pretrained(merged_hi: tuple[Path, ControlNet], tmp_path: Path) -> None:
    ckpt, net = merged_hi
    out = tmp_path / "controlnet"
    assert export_diffusers.main([str(ckpt), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME] and not _leftovers(tmp_path)
    assert json.loads((out / CONFIG_NAME).read_text())["_class_name"] == "ControlNetModel"
    assert read_metadata(out / WEIGHTS_NAME)["siamese.kind"] == "diffusers_controlnet"
    theirs = diffusers.ControlNetModel.from_pretrained(str(out), local_files_only=True).eval()
    diff = max_residual_diff(net.eval(), theirs)
    logger.info("max abs residual difference, CLI export loaded with from_pretrained: %.3g", diff)
    assert diff < TOLERANCE


def test_cli_refusals(merged_hi: tuple[Path, ControlNet], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt, _ = merged_hi
    out = tmp_path / "controlnet"

    def refused(argv: list[str], *needles: str) -> None:
        rc, errors = _run(argv, caplog)
        assert rc == 1 and len(errors) == 1 and "\n" not in errors[0], errors
        assert all(n in errors[0] for n in needles), errors[0]
        assert not out.exists() and not _leftovers(tmp_path)

    dhi_ckpt, _ = _merged(tmp_path / "dhi.safetensors", "dhi")
    refused([str(dhi_ckpt), str(out)], "hint_encoder=dhi", "DenseHintEncoder", "controlnet_cond_embedding")
    hi_config = save_config(load_config(CONTROLNET_TINY, ["model.control.hint_encoder=hi"]), tmp_path / "hi.yaml")
    refused([str(dhi_ckpt), str(out), "--config", str(hi_config)], "DHI hint encoder", "DenseHintEncoder")
    refused([str(tmp_path / "nope.safetensors"), str(out)], "not found", "nope.safetensors")
    refused([str(ckpt), str(out), "--config", str(CONTROLNET_TINY)], "hint_encoder=dhi")

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, errors = _run([str(ckpt), str(out)], caplog)
    assert rc == 1 and len(errors) == 1 and "--force" in errors[0] and (out / "keep.txt").is_file()
    rc, errors = _run([str(ckpt), str(out), "--force"], caplog)  # --force replaces a previous export, nothing else
    assert rc == 1 and "keep.txt" in errors[0] and (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    (out / CONFIG_NAME).write_text("{}")
    assert export_diffusers.main([str(ckpt), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME] and not _leftovers(tmp_path)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, errors = _run([str(ckpt), str(a_file), "--force"], caplog)
    assert rc == 1 and "is a file" in errors[0] and a_file.read_text() == "x"


def test_cli_help() -> None:
    with pytest.raises(SystemExit) as info:
        export_diffusers.main(["--help"])
    assert info.value.code == 0
