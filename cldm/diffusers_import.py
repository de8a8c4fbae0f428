"""Stable Diffusion 1.x from a diffusers pipeline folder, renamed to this project's original LDM layout.

A diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``) holds the networks
under diffusers' and transformers' names. ``from_diffusers`` reads each part's ``config.json``, refuses in one line
naming the key what this model cannot compute exactly (SD2 768-v's ``prediction_type: v_prediction``, SDXL's added
embeddings, GroupNorm group counts other than ``ldm.attention.group_norm_groups``, ...), and renames the weights,
checked key for key and shape for shape:

* ``unet/`` (``UNet2DConditionModel``): the encoder half by the module table of the ControlNet export
  (``cldm.diffusers_export``: the same ``down_blocks`` / ``mid_block`` names), the decoder half (``up_blocks.L``,
  lowest resolution first as ``output_blocks``) read off a ``UNetModel`` on the meta device;
* ``vae/`` (``AutoencoderKL``), read off ``ldm.autoencoder.AutoencoderKL`` on the meta device: the decoder's
  ``up_blocks.i`` is ``up.{n-1-i}`` here; the middle attention's ``nn.Linear`` ``to_q/to_k/to_v/to_out.0`` ([C, C];
  ``query/key/value/proj_attn`` before diffusers 0.15) become the 1×1 convs ``q/k/v/proj_out`` ([C, C, 1, 1]: the
  same map at every pixel, so the reshape is exact);
* ``text_encoder/`` (``CLIPTextModel``): SD1.5 files keep transformers' names (with ``text_model.``, which transformers
  5 no longer saves). ``tokenizer/`` is not read: ``ldm.text_encoder`` has open_clip's copy of the same BPE vocabulary.

``SDGeometry.mismatches`` compares the folder with a config, including what shapes cannot show (head counts, the
latent scale factor, the noise schedule). ``cldm.convert.load_sd_weights`` is the reader of every SD base.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldm.attention import SpatialTransformer, group_norm_groups
from ldm.autoencoder import AutoencoderKL
from ldm.checkpoint import compare_keys, load_state_dict
from ldm.schedule import BETA_KINDS
from ldm.text_encoder import FrozenCLIPTextEncoder, TextEncoderConfig
from ldm.unet import UNetConfig, UNetModel, Upsample

import torch
from torch import Tensor

from cldm.controlnet import ControlConfig, ControlNet
from cldm.diffusers_export import _RESBLOCK_NAMES, _module_names

MODEL_INDEX = "model_index.json"
# The weight files of each part, the first one present is read: fp32 before fp16, safetensors before pickles.
_DIFFUSERS = tuple(f"diffusion_pytorch_model{s}" for s in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"))
PARTS = {"unet": _DIFFUSERS, "vae": _DIFFUSERS, "text_encoder": (
    "model.safetensors", "model.fp16.safetensors", "pytorch_model.bin", "pytorch_model.fp16.bin")}
# Settings of UNet2DConditionModel / AutoencoderKL / CLIPTextConfig → the values this project's networks compute (an
# absent key takes diffusers' default, which is the first value). Anything else is refused, naming the key.
_UNET_FIXED: dict[str, tuple[Any, ...]] = {
    "_class_name": ("UNet2DConditionModel",),
    **dict.fromkeys(("class_embed_type", "num_class_embeds", "addition_embed_type", "encoder_hid_dim",
                     "encoder_hid_dim_type", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act",
                     "time_cond_proj_dim", "projection_class_embeddings_input_dim", "cross_attention_norm",
                     "reverse_transformer_layers_per_block"), (None,)),
    **dict.fromkeys(("center_input_sample", "only_cross_attention", "dual_cross_attention", "resnet_skip_time_act",
                     "class_embeddings_concat"), (False,)),
    "flip_sin_to_cos": (True,), "freq_shift": (0,), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "act_fn": ("silu",), "norm_eps": (1e-5,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "resnet_time_scale_shift": ("default",), "resnet_out_scale_factor": (1.0,), "time_embedding_type": ("positional",),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "mid_block_only_cross_attention": (None, False)}
_VAE_FIXED: dict[str, tuple[Any, ...]] = {
    **dict.fromkeys(("shift_factor", "latents_mean", "latents_std"), (None,)), "_class_name": ("AutoencoderKL",),
    **dict.fromkeys(("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"), (True,)), "act_fn": ("silu",)}
_TEXT_FIXED: dict[str, tuple[Any, ...]] = {"hidden_act": ("quick_gelu", "gelu"), "layer_norm_eps": (1e-5,),
                                           "model_type": ("clip_text_model",), "architectures": ("CLIPTextModel",)}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_VAE_ATTENTION_RE = re.compile(r"\.mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _names(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (every part of a diffusers folder has one)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not readable JSON ({exc})") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")


def _check_fixed(config: Mapping[str, Any], fixed: Mapping[str, tuple[Any, ...]], where: str, what: str) -> None:
    for key, allowed in fixed.items():
        value = config.get(key, allowed[0])
        if not all(v in allowed for v in (value if isinstance(value, list) else [value])):
            raise ValueError(f"{where}: {key}={value!r} cannot be expressed by this project's {what} (it computes "
                             f"{' or '.join(map(repr, allowed))})")


def _one(config: Mapping[str, Any], key: str, default: Any, where: str) -> Any:
    """A setting diffusers allows per block that this project has once for the whole network."""
    value = config.get(key, default)
    if isinstance(value, list) and len(set(value)) != 1:
        raise ValueError(f"{where}: {key}={value} differs per block; this project's network has one value")
    return value[0] if isinstance(value, list) else value


def _widths(config: Mapping[str, Any], norm_groups: int, where: str) -> tuple[int, tuple[int, ...]]:
    """(base width, channel multipliers) of block_out_channels, with the GroupNorm rule checked at each width."""
    widths = [int(w) for w in config["block_out_channels"]]
    if not widths or any(w % widths[0] for w in widths):
        raise ValueError(f"{where}: block_out_channels={widths} must be multiples of the first width")
    for width in widths:
        if group_norm_groups(width) != norm_groups:
            raise ValueError(f"{where}: norm_num_groups={norm_groups} but this project's GroupNorm uses "
                             f"{group_norm_groups(width)} groups at width {width} (ldm.attention.group_norm_groups)")
    return widths[0], tuple(w // widths[0] for w in widths)


def unet_geometry(config: Mapping[str, Any], where: str) -> UNetConfig:
    """The ``UNetConfig`` of a diffusers ``UNet2DConditionModel`` config, or a one-line ValueError."""
    _check_fixed(config, _UNET_FIXED, where, "UNet")
    model_channels, mult = _widths(config, int(config.get("norm_num_groups", 32)), where)
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if len(down) != len(mult) or any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down):
        raise ValueError(f"{where}: down_block_types={down}: expected one CrossAttnDownBlock2D or DownBlock2D per "
                         f"block_out_channels entry")
    mirror = ["CrossAttnUpBlock2D" if t.startswith("CrossAttn") else "UpBlock2D" for t in reversed(down)]
    if up != mirror:
        raise ValueError(f"{where}: up_block_types={up} is not the mirror of down_block_types ({mirror}), the only "
                         f"decoder this project's UNet has")
    heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)  # diffusers' legacy naming
    heads = [int(h) for h in (heads if isinstance(heads, list) else [heads] * len(down))]
    attention = [level for level, kind in enumerate(down) if kind.startswith("CrossAttn")]
    used = sorted(set(attention) | {len(down) - 1})  # the middle block attends at the last width
    pairs = [(model_channels * mult[level], heads[level]) for level in used]
    per_head = {w // h for w, h in pairs}
    if len({h for _, h in pairs}) == 1:
        num_heads, num_head_channels = pairs[0][1], -1
    elif len(per_head) == 1:
        num_heads, num_head_channels = -1, per_head.pop()
    else:
        raise ValueError(f"{where}: attention_head_dim={heads} (heads per level) is neither one head count nor one "
                         f"head width; this project's UNet sets num_heads or num_head_channels for all levels")
    try:
        cfg = UNetConfig(
            image_size=int(config.get("sample_size") or 64), in_channels=int(config.get("in_channels", 4)),
            out_channels=int(config.get("out_channels", 4)), model_channels=model_channels,
            attention_resolutions=tuple(2 ** level for level in attention),
            num_res_blocks=int(_one(config, "layers_per_block", 2, where)), channel_mult=mult, num_heads=num_heads,
            num_head_channels=num_head_channels,
            transformer_depth=int(_one(config, "transformer_layers_per_block", 1, where)),
            context_dim=int(_one(config, "cross_attention_dim", 1280, where)),
            use_linear_in_transformer=bool(config.get("use_linear_projection", False)))
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    for width, count in pairs:
        if cfg.heads_for(width) != (count, width // count):
            raise ValueError(f"{where}: {count} heads at width {width} cannot be expressed with num_heads / "
                             f"num_head_channels (attention_head_dim={heads})")
    return cfg


def vae_geometry(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``model.first_stage`` section (``FirstStageConfig`` as a dict) of a diffusers ``AutoencoderKL`` config."""
    _check_fixed(config, _VAE_FIXED, where, "AutoencoderKL")
    ch, mult = _widths(config, int(config.get("norm_num_groups", 32)), where)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(config[key]) != [kind] * len(mult):
            raise ValueError(f"{where}: {key}={config.get(key)}: expected {kind} for each of the {len(mult)} levels")
    latent = int(config.get("latent_channels", 4))
    return {"kind": "autoencoder_kl", "embed_dim": latent, "scale_factor": float(config.get("scaling_factor", 0.18215)),
            "ddconfig": {"double_z": True, "z_channels": latent, "resolution": int(config.get("sample_size", 512)),
                         "in_channels": int(config.get("in_channels", 3)), "out_ch": int(config.get("out_channels", 3)),
                         "ch": ch, "ch_mult": mult, "num_res_blocks": int(config.get("layers_per_block", 1)),
                         "attn_resolutions": (), "dropout": 0.0}}


def text_geometry(config: Mapping[str, Any], where: str) -> TextEncoderConfig:
    """The ``TextEncoderConfig`` of a transformers ``CLIPTextConfig`` (``text_encoder/config.json``)."""
    _check_fixed(config, _TEXT_FIXED, where, "CLIP text encoder (open_clip's text tower)")
    width = int(config["hidden_size"])
    if int(config.get("intermediate_size", 4 * width)) != 4 * width:
        raise ValueError(f"{where}: intermediate_size={config['intermediate_size']}: the text tower's MLP is 4 × "
                         f"hidden_size={width} wide here")
    try:
        return TextEncoderConfig(vocab_size=int(config["vocab_size"]), width=width,
                                 layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
                                 context_length=int(config["max_position_embeddings"]),
                                 quick_gelu=config.get("hidden_act", "quick_gelu") == "quick_gelu")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def schedule_geometry(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ``model.schedule`` section of a diffusers scheduler config; v-prediction and custom betas are refused."""
    prediction = config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(f"{where}: prediction_type={prediction!r}: this project's UNet predicts the noise (epsilon) "
                         f"only; SD2's 768-v models and other v/sample-prediction bases are not Stable Diffusion 1.x")
    if config.get("trained_betas") is not None or config.get("beta_schedule", "scaled_linear") not in BETA_KINDS:
        raise ValueError(f"{where}: beta_schedule={config.get('beta_schedule')!r} / trained_betas: expected one of "
                         f"{list(BETA_KINDS)}")
    return {"beta_schedule": config.get("beta_schedule", "scaled_linear"),
            "timesteps": int(config.get("num_train_timesteps", 1000)),
            "linear_start": float(config.get("beta_start", 0.00085)),
            "linear_end": float(config.get("beta_end", 0.012))}


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], section: str, where: str) -> list[str]:
    out = []
    for key, value in theirs.items():
        if isinstance(value, Mapping):
            out += _differences(value, ours[key], f"{section}.{key}", where)
            continue
        # Sequences as lists; the attention resolutions are a set (any order).
        a, b = ((sorted(v) if key.startswith("att") else list(v)) if isinstance(v, (tuple, list)) else v
                for v in (value, ours[key]))
        if not (math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b):
            out.append(f"{section}.{key}: {where} gives {a}, the config has {b}")
    return out


@dataclass(frozen=True)
class SDGeometry:
    """What a diffusers folder's config files say, in this project's config sections."""

    unet: UNetConfig
    first_stage: dict[str, Any]
    text_encoder: TextEncoderConfig
    schedule: dict[str, Any] | None = None  # None: the folder has no scheduler/ (the config's schedule is used)

    def mismatches(self, unet: UNetConfig, first_stage: Mapping[str, Any], text_encoder: TextEncoderConfig,
                   schedule: Mapping[str, Any]) -> list[str]:
        """Every computed setting where the folder and a config's ``model`` sections differ, one line each."""
        skip = {"image_size", "use_checkpoint", "dropout", "legacy", "num_heads", "num_head_channels"}
        out = _differences({k: v for k, v in asdict(self.unet).items() if k not in skip}, asdict(unet),
                           "model.unet", "unet/config.json")
        if not out:  # heads compared per width (num_heads: 8 and num_head_channels: 40 can be the same model)
            for width in dict.fromkeys(unet.model_channels * m for m in unet.channel_mult):
                if self.unet.heads_for(width) != unet.heads_for(width):
                    out.append(f"model.unet heads at width {width}: unet/config.json gives "
                               f"{self.unet.heads_for(width)[0]}, the config has {unet.heads_for(width)[0]}")
        dd = {k: v for k, v in self.first_stage["ddconfig"].items() if k not in ("resolution", "dropout")}
        out += _differences({**self.first_stage, "ddconfig": dd}, first_stage, "model.first_stage", "vae/config.json")
        out += _differences(asdict(self.text_encoder), asdict(text_encoder), "model.text_encoder",
                            "text_encoder/config.json")
        if self.schedule is not None:
            out += _differences(self.schedule, schedule, "model.schedule", "scheduler/scheduler_config.json")
        return out


def unet_names(cfg: UNetConfig) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(module path here → module path in diffusers' UNet2DConditionModel, the UNet's meta state dict)."""
    with torch.device("meta"):
        control = ControlNet(cfg, ControlConfig(hint_encoder="hi"))  # only for the export's encoder table
        unet = UNetModel(cfg)
    names = {k: v for k, v in _module_names(control).items()
             if not k.startswith(("zero_convs.", "middle_block_out.", "input_hint_block."))}
    for index, block in enumerate(unet.output_blocks):
        level, layer = divmod(index, cfg.num_res_blocks + 1)
        names.update({f"output_blocks.{index}.0.{a}": f"up_blocks.{level}.resnets.{layer}.{b}"
                      for a, b in _RESBLOCK_NAMES.items()})
        for position, module in enumerate(block):
            if isinstance(module, SpatialTransformer):
                names[f"output_blocks.{index}.{position}"] = f"up_blocks.{level}.attentions.{layer}"
            elif isinstance(module, Upsample):
                names[f"output_blocks.{index}.{position}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
    names.update({"out.0": "conv_norm_out", "out.2": "conv_out"})
    return names, dict(unet.state_dict())


def vae_names(first_stage: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(module path here → module path in diffusers' AutoencoderKL, the VAE's meta state dict)."""
    with torch.device("meta"):
        vae = AutoencoderKL(embed_dim=first_stage["embed_dim"], scale_factor=first_stage["scale_factor"],
                            **first_stage["ddconfig"])
    names = {n: n for n in ("quant_conv", "post_quant_conv", "encoder.conv_in", "encoder.conv_out",
                            "decoder.conv_in", "decoder.conv_out")}
    for side, ours, theirs, resampler in (("encoder", "down", "down_blocks", "downsample"),
                                          ("decoder", "up", "up_blocks", "upsample")):
        levels = getattr(getattr(vae, side), ours)
        for i, level in enumerate(levels):
            target = f"{side}.{theirs}.{i if side == 'encoder' else len(levels) - 1 - i}"
            for j in range(len(level.block)):
                names[f"{side}.{ours}.{i}.block.{j}"] = f"{target}.resnets.{j}"
                names[f"{side}.{ours}.{i}.block.{j}.nin_shortcut"] = f"{target}.resnets.{j}.conv_shortcut"
            if getattr(level, resampler) is not None:
                names[f"{side}.{ours}.{i}.{resampler}"] = f"{target}.{resampler}rs.0"
        mid = f"{side}.mid_block"
        names.update({f"{side}.mid.block_1": f"{mid}.resnets.0", f"{side}.mid.block_2": f"{mid}.resnets.1",
                      f"{side}.norm_out": f"{side}.conv_norm_out"})
        names.update({f"{side}.mid.attn_1.{b}": f"{mid}.attentions.0.{a}" for a, b in _VAE_ATTENTION.items()})
    return names, dict(vae.state_dict())


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    """``key`` with its longest module prefix found in ``table`` replaced, or None."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    return None


def _convert(state: Mapping[str, Tensor], names: Mapping[str, str], expected: Mapping[str, Tensor], where: str,
             what: str) -> dict[str, Tensor]:
    """Diffusers-named ``state`` → our names, checked against ``expected`` (renamed to diffusers' names first, so a
    message names the keys the user's file has)."""
    theirs = {_rename(key, names): like.shape for key, like in expected.items()}
    inverse = {v: k for k, v in names.items()}
    if None in theirs or len(inverse) != len(names) or len(theirs) != len(expected):
        raise ValueError("the diffusers renaming is not one-to-one (a bug in cldm/diffusers_import.py)")
    theirs = {k: shape[:2] if _VAE_ATTENTION_RE.search(k) else shape for k, shape in theirs.items()}
    compare_keys(theirs, state).raise_if_bad(f"{where} does not hold the {what} its config.json describes")
    out = {}
    for key, value in state.items():
        ours = _rename(key, inverse)
        out[ours] = value.reshape(expected[ours].shape) if value.dim() != expected[ours].dim() else value
    return out


def _geometry(folder: Path, part: str, read: Any) -> Any:
    """``read`` (a ``*_geometry`` function) on the part's config.json, naming a missing part or setting."""
    if not (folder / part).is_dir():
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise FileNotFoundError(f"{folder}: diffusers folder without its {part}/ part (it holds {_names(found)}); "
                                f"Stable Diffusion needs {', '.join(p + '/' for p in PARTS)}")
    where = f"{folder}/{part}/config.json"
    try:
        return read(_read_json(folder / part / "config.json"), where)
    except KeyError as exc:
        raise ValueError(f"{where}: no {exc} setting (diffusers and transformers write every one)") from None
    except TypeError as exc:  # a setting of the wrong type (null, a string for a number)
        raise ValueError(f"{where}: {exc}") from None


def _read_weights(folder: Path, part: str, unsafe_pickle: bool) -> tuple[dict[str, Tensor], Path]:
    """The first of ``PARTS[part]`` present (diffusers shards above 10 GB per file, which no SD1.x part reaches)."""
    for name in PARTS[part]:
        if (folder / part / name).is_file():
            return load_state_dict(folder / part / name, unsafe_pickle=unsafe_pickle), folder / part / name
    found = sorted(p.name for p in (folder / part).iterdir())
    raise FileNotFoundError(f"{folder}/{part}: no weights: expected {PARTS[part][0]} (or "
                            f"{', '.join(PARTS[part][1:])}); it holds {_names(found) or 'nothing'}")


@dataclass
class DiffusersWeights:
    """The three networks of a diffusers folder under this project's names, each relative to its prefix
    (``model.diffusion_model.`` / ``first_stage_model.`` / ``cond_stage_model.transformer.text_model.``)."""

    unet: dict[str, Tensor]
    vae: dict[str, Tensor]
    text_encoder: dict[str, Tensor]  # transformers' CLIPTextModel names without text_model.
    files: list[Path]  # the weight files read, in part order
    geometry: SDGeometry
    notes: list[str] = field(default_factory=list)


def from_diffusers(folder: str | Path, *, unsafe_pickle: bool = False) -> DiffusersWeights:
    """A diffusers Stable Diffusion 1.x pipeline folder → the original layout (see the module docstring)."""
    folder = Path(folder)
    index = _read_json(folder / MODEL_INDEX)
    if "text_encoder_2" in index:
        raise ValueError(f"{folder / MODEL_INDEX}: lists text_encoder_2 ({index.get('_class_name')}): an SDXL-family "
                         f"pipeline, not Stable Diffusion 1.x")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    schedule = schedule_geometry(_read_json(scheduler), str(scheduler)) if scheduler.is_file() else None
    # Every config is read and checked before any weights: a folder of another model fails at once.
    geometry = SDGeometry(_geometry(folder, "unet", unet_geometry), _geometry(folder, "vae", vae_geometry),
                          _geometry(folder, "text_encoder", text_geometry), schedule)
    notes: list[str] = []
    weights, unet_file = _read_weights(folder, "unet", unsafe_pickle)
    unet = _convert(weights, *unet_names(geometry.unet), str(unet_file), "UNet2DConditionModel")
    weights, vae_file = _read_weights(folder, "vae", unsafe_pickle)
    renamed = {}
    for key, value in weights.items():
        head, _, last = key.rpartition(".")
        stem, _, proj = head.rpartition(".")
        if stem.endswith("attentions.0") and proj in _VAE_DEPRECATED:  # names before diffusers 0.15
            key = f"{stem}.{_VAE_DEPRECATED[proj]}.{last}"
        renamed[key] = value.flatten(1) if _VAE_ATTENTION_RE.search(key) else value  # [C, C, 1, 1] saves too
    if any(k not in weights for k in renamed):
        notes.append("vae: deprecated attention names (query/key/value/proj_attn) read as to_q/to_k/to_v/to_out.0")
    vae = _convert(renamed, *vae_names(geometry.first_stage), str(vae_file), "AutoencoderKL")
    weights, text_file = _read_weights(folder, "text_encoder", unsafe_pickle)
    with torch.device("meta"):
        expected = FrozenCLIPTextEncoder(geometry.text_encoder).sd15_state_dict()
    text = {k.removeprefix("text_model."): v for k, v in weights.items()}
    compare_keys(expected, text, ignore_suffixes=("embeddings.position_ids",)).raise_if_bad(
        f"{text_file} does not hold the CLIPTextModel its config.json describes")
    if schedule is None:
        notes.append("no scheduler/scheduler_config.json: the config's noise schedule is used unchecked")
    files = [unet_file, vae_file, text_file]
    dtypes = {str(v.dtype)[6:] for part in (unet, vae, text) for v in part.values() if v.is_floating_point()}
    notes.append(f"read {', '.join(str(f.relative_to(folder)) for f in files)} ({'/'.join(sorted(dtypes))})")
    return DiffusersWeights(unet, vae, text, files, geometry, notes)
