"""A plain ControlNet (HI hint encoder) under diffusers' ``ControlNetModel`` names, and its ``config.json``.

This project keeps the original ControlNet / latent-diffusion layout (``control_model.*``: ``time_embed``,
``input_hint_block``, ``input_blocks``, ``middle_block``, ``zero_convs``, ``middle_block_out``); diffusers stores the
same network as ``ControlNetModel`` (``time_embedding``, ``controlnet_cond_embedding``, ``conv_in``, ``down_blocks``,
``mid_block``, ``controlnet_down_blocks``, ``controlnet_mid_block``). The renaming is a pure function of the geometry:
the table is read off a ``ControlNet`` built on the meta device, so it follows ``ldm.unet.build_encoder`` (block
order) and ``cldm.hint.HintEncoder`` (layer order) instead of re-deriving them. Tensors are passed through unchanged
(no reshaping or dtype change); transformer names below ``attentions.N`` are identical in both layouts.

What diffusers cannot express is refused with a one-line ``ValueError`` naming the setting, never exported
approximately:

* the DHI hint encoder: ``ControlNetModel`` has only the HI conditioning embedding (a diffusers user must swap a
  module with the ``DenseHintEncoder`` structure into ``controlnet_cond_embedding``; docs/sampling.md);
* GroupNorm with other than 32 groups (this project uses the largest divisor ≤ 32 for widths below 32 or not
  divisible by 32, ``ldm.attention.group_norm_groups``; diffusers has one ``norm_num_groups`` for every norm);
* ``channel_mult[0] != 1`` (diffusers' conv_in and conditioning embedding output ``block_out_channels[0]``, ours
  ``model_channels``), attention widths that are not ``heads × dim_head`` (diffusers takes ``dim_head = channels //
  heads``), and ``conv_resample: false`` (diffusers always downsamples with a convolution);
* ``control.only_mid_control`` and ``control.control_scale != 1``: both are refused rather than recorded. diffusers'
  UNet adds every residual (no mid-only switch), and a scale is a call argument of its pipelines
  (``controlnet_conditioning_scale``), not part of the model: export with ``control_scale: 1`` and pass the scale
  there.

``unet.dropout`` and ``use_checkpoint`` are training-time settings and are not exported. The ``config.json`` uses
diffusers' legacy naming for the SD1.5 family: ``attention_head_dim`` holds the number of heads (an int when every
level has the same, as SD1.5's 8; a list per level otherwise, as SD2's ``num_head_channels: 64`` gives).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.attention import group_norm_groups
from ldm.checkpoint import compare_keys
from ldm.unet import Downsample, UNetConfig

import torch
from torch import Tensor, nn

from cldm.controlnet import ControlConfig, ControlNet
from cldm.hint import HintEncoder
from cldm.settings import DIFFUSERS_CONFIG_NAME as CONFIG_NAME  # noqa: F401  (re-exported)
from cldm.settings import DIFFUSERS_WEIGHTS_NAME as WEIGHTS_NAME  # noqa: F401

DIFFUSERS_CLASS = "ControlNetModel"
DIFFUSERS_NORM_GROUPS = 32  # diffusers' norm_num_groups, the same for every GroupNorm of the model

# ResBlock (in_layers = GroupNorm, SiLU, conv; emb_layers = SiLU, Linear; out_layers = GroupNorm, SiLU, Dropout, conv)
# → diffusers' ResnetBlock2D. skip_connection is a 1×1 conv only when the width changes.
_RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

_DHI_HELP = ("diffusers' ControlNetModel has only the HI conditioning embedding: a diffusers user must swap a module "
             "with this project's DenseHintEncoder structure (cldm/hint.py) into controlnet_cond_embedding and load "
             "this checkpoint's input_hint_block.* weights into it; the rest of the mapping is the same "
             "(docs/sampling.md, section Export to diffusers)")


def _problem(unet: UNetConfig, control: ControlConfig) -> str | None:
    """The first setting diffusers' ControlNetModel cannot express, or None."""
    if control.hint_encoder != "hi":
        return f"control.hint_encoder={control.hint_encoder} cannot be exported: {_DHI_HELP}"
    if control.only_mid_control:
        return ("control.only_mid_control=true cannot be exported: diffusers' UNet adds every ControlNet residual and "
                "has no mid-only switch")
    if control.control_scale != 1.0:
        return (f"control.control_scale={control.control_scale} is not part of a diffusers model: export with "
                f"model.control.control_scale=1.0 (--config) and pass controlnet_conditioning_scale="
                f"{control.control_scale} to the diffusers pipeline")
    if unet.channel_mult[0] != 1:
        return (f"unet.channel_mult[0]={unet.channel_mult[0]} cannot be exported: diffusers' ControlNetModel needs 1 "
                "(its conv_in and conditioning embedding output block_out_channels[0])")
    if not unet.conv_resample:
        return "unet.conv_resample=false cannot be exported: diffusers' down blocks always downsample with a conv"
    for width in dict.fromkeys(unet.model_channels * m for m in unet.channel_mult):
        groups = group_norm_groups(width)
        if groups != DIFFUSERS_NORM_GROUPS:
            return (f"width {width} uses GroupNorm({groups}) here but diffusers has norm_num_groups="
                    f"{DIFFUSERS_NORM_GROUPS} for every norm: every model_channels × channel_mult must be a multiple "
                    f"of {DIFFUSERS_NORM_GROUPS}")
        heads, dim_head = unet.heads_for(width)
        if heads * dim_head != width:
            return (f"width {width} has {heads} heads × {dim_head} channels = {heads * dim_head} here, but diffusers "
                    f"uses channels // heads per head: choose num_heads / num_head_channels that divide the widths")
    return None


def check_exportable(unet: UNetConfig, control: ControlConfig) -> None:
    """Raise a one-line ValueError when diffusers' ControlNetModel cannot hold this geometry exactly."""
    problem = _problem(unet, control)
    if problem is not None:
        raise ValueError(problem)


def _heads_per_level(unet: UNetConfig) -> list[int]:
    return [unet.heads_for(unet.model_channels * m)[0] for m in unet.channel_mult]


def _hint_layout(hint_channels: int, model_channels: int) -> tuple[list[int], list[int]]:
    """(Sequential indices of HintEncoder's convolutions, conditioning_embedding_out_channels).

    diffusers' ControlNetConditioningEmbedding is conv_in, then per stage a 3×3 conv keeping the width and a
    stride-2 conv changing it, then the zero conv conv_out, SiLU after all but the last: HI's layer list exactly.
    The widths are read from the module so that the config and the renaming cannot drift from cldm/hint.py.
    """
    with torch.device("meta"):
        encoder = HintEncoder(hint_channels, model_channels)
    convs = [(i, m) for i, m in enumerate(encoder) if isinstance(m, nn.Conv2d)]
    strides = [m.stride[0] for _, m in convs[1:-1]]
    if strides != [1, 2] * (len(strides) // 2) or len(strides) % 2:
        raise ValueError(f"HintEncoder's stride pattern {strides} is not diffusers' conditioning embedding layout")
    widths = [convs[0][1].out_channels] + [m.out_channels for _, m in convs[2:-1:2]]
    return [i for i, _ in convs], widths


def _module_names(net: ControlNet) -> dict[str, str]:
    """Module path here → module path in diffusers' ControlNetModel (parameters keep their last name)."""
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "middle_block_out.0": "controlnet_mid_block"}

    def resblock(ours: str, theirs: str) -> None:
        names.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in _RESBLOCK_NAMES.items()})

    level, layer = 0, 0
    for index, block in enumerate(net.input_blocks[1:], start=1):
        if isinstance(block[0], Downsample):
            names[f"input_blocks.{index}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, layer = level + 1, 0
            continue
        resblock(f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{layer}")
        if len(block) > 1:
            names[f"input_blocks.{index}.1"] = f"down_blocks.{level}.attentions.{layer}"
        layer += 1
    resblock("middle_block.0", "mid_block.resnets.0")
    names["middle_block.1"] = "mid_block.attentions.0"
    resblock("middle_block.2", "mid_block.resnets.1")
    names.update({f"zero_convs.{k}.0": f"controlnet_down_blocks.{k}" for k in range(len(net.zero_convs))})
    cfg = net.control_config
    convs, _ = _hint_layout(cfg.hint_channels, net.unet_config.model_channels)
    names[f"input_hint_block.{convs[0]}"] = "controlnet_cond_embedding.conv_in"
    names[f"input_hint_block.{convs[-1]}"] = "controlnet_cond_embedding.conv_out"
    names.update({f"input_hint_block.{i}": f"controlnet_cond_embedding.blocks.{n}" for n, i in enumerate(convs[1:-1])})
    return names


def _rename(key: str, names: Mapping[str, str]) -> str:
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in names:
            return ".".join([names[head], *parts[cut:]])
    raise KeyError(f"no diffusers name for {key!r}")


def to_diffusers(state: Mapping[str, Tensor], unet: UNetConfig, control: ControlConfig, *,
                 prefix: str = "control_model.") -> dict[str, Tensor]:
    """The ControlNet weights of ``state`` under diffusers' ``ControlNetModel`` names (same tensors).

    ``state``: a merged / inference checkpoint (the ``prefix`` entries are taken, everything else is ignored) or,
    with ``prefix=""``, ``ControlNet.state_dict()`` itself. The ControlNet part must match the model of
    ``unet`` + ``control`` key for key and shape; a DHI hint encoder is refused with what to do instead.
    """
    check_exportable(unet, control)
    net_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)
    if not net_state:
        raise ValueError(f"no {prefix}* keys: not a ControlNet checkpoint (an SD base or a VAE?)")
    if any(k.startswith("input_hint_block.0.initial_conv.") for k in net_state):
        raise ValueError(f"the checkpoint holds a DHI hint encoder (input_hint_block.0.initial_conv.*): {_DHI_HELP}")
    with torch.device("meta"):
        net = ControlNet(unet, control)
    where = f"{prefix}*" if prefix else "the ControlNet state dict"
    compare_keys(net.state_dict(), net_state).raise_if_bad(f"{where} does not match the ControlNet of this config")
    names = _module_names(net)
    out = {_rename(k, names): v for k, v in net_state.items()}
    if len(out) != len(net_state):  # two keys onto one name would silently lose a tensor
        raise ValueError("the diffusers renaming is not one-to-one (a bug in cldm/diffusers_export.py)")
    return out


def diffusers_config(unet: UNetConfig, control: ControlConfig) -> dict[str, Any]:
    """The ``config.json`` of the exported model (``ControlNetModel.from_config`` takes it as is)."""
    check_exportable(unet, control)
    heads = _heads_per_level(unet)
    _, cond_widths = _hint_layout(control.hint_channels, unet.model_channels)
    down_types = ["CrossAttnDownBlock2D" if 2 ** level in unet.attention_resolutions else "DownBlock2D"
                  for level in range(len(unet.channel_mult))]
    return {
        "_class_name": DIFFUSERS_CLASS,
        "act_fn": "silu",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,  # legacy name: the number of heads
        "block_out_channels": [unet.model_channels * m for m in unet.channel_mult],
        "class_embed_type": None,
        "conditioning_channels": control.hint_channels,
        "conditioning_embedding_out_channels": cond_widths,
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": unet.context_dim,
        "down_block_types": down_types,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,  # [cos | sin] halves, as ldm.attention.timestep_embedding
        "freq_shift": 0,
        "global_pool_conditions": False,
        "in_channels": unet.in_channels,
        "layers_per_block": unet.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,  # ResBlock GroupNorms; the transformers' eps 1e-6 is fixed on both sides
        "norm_num_groups": DIFFUSERS_NORM_GROUPS,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": unet.transformer_depth,
        "upcast_attention": False,
        "use_linear_projection": unet.use_linear_in_transformer,
    }
