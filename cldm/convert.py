"""Checkpoint conversions between an SD1.5 base, training outputs and the inference checkpoint (pure functions).

The original repository does these with three scripts that copy tensors by name and skip anything that does not
fit. Here each conversion is a function over ``{name: tensor}`` dicts that checks every key and shape against the
model it targets (usually the model built on the meta device, so checks cost no memory) and returns a report of
what it did; the command-line tools in ``tools/`` add file I/O and printing.

- ``add_control``: SD1.5 base → the initial ControlNet checkpoint (``control_model.*`` copied from the UNet
  encoder and middle block, hint encoder and zero convolutions freshly initialised).
- ``training_to_model_keys``: a training checkpoint (Lightning module names, text tower in open_clip layout) →
  the model's own key names (the original layout).
- ``merge_weights``: trained weights overlaid on a full base checkpoint.
- ``load_sd_weights``: any SD1.x base a user has (a single file, or a diffusers folder via
  ``cldm.diffusers_import``) → one state dict in the original layout, saying which layout it saw.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.checkpoint import CheckpointKeyError, KeyReport, compare_keys, load_state_dict
from ldm.schedule import Schedule
from ldm.text_encoder import open_clip_to_sd15

import torch
from torch import Tensor

from cldm.diffusers_import import MODEL_INDEX, SDGeometry, from_diffusers
from cldm.hint import build_hint_encoder
from cldm.model import SD15_TEXT_PREFIX, ControlLDM
from cldm.settings import CONTROL_PREFIX, FIRST_STAGE_PREFIX, TEXT_PREFIX, UNET_PREFIX  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

# The three networks every Stable Diffusion 1.x checkpoint holds (the ControlNet is what add_control creates).
SD_PREFIXES = (UNET_PREFIX, FIRST_STAGE_PREFIX, TEXT_PREFIX + SD15_TEXT_PREFIX)
# Keys a base checkpoint may carry that no model here uses: the EMA copy of the original training.
IGNORED_PREFIXES = ("model_ema.",)
OPTIONAL_SUFFIXES = ("embeddings.position_ids",)
_LIMIT = 5


def _names(keys: list[str], limit: int = _LIMIT) -> str:
    more = f", ... {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _prefix_of(key: str) -> str:
    """``model.diffusion_model.input_blocks.0.0.weight`` → ``model.diffusion_model.*`` (for messages)."""
    for prefix in SD_PREFIXES + (CONTROL_PREFIX, TEXT_PREFIX) + IGNORED_PREFIXES:
        if key.startswith(prefix):
            return prefix + "*"
    return key.split(".", 1)[0] + (".*" if "." in key else "")


def _cast_like(value: Tensor, like: Tensor) -> tuple[Tensor, bool]:
    """``value`` in the dtype the model holds for that key (floating tensors only)."""
    if value.is_floating_point() and like.is_floating_point() and value.dtype != like.dtype:
        return value.to(like.dtype), True
    return value, False


def expected_state(model: ControlLDM) -> dict[str, Tensor]:
    """The model's state dict under the original names (meta tensors for a model built on the meta device)."""
    return dict(model.state_dict())


def fresh_control_weights(model: ControlLDM, seed: int) -> dict[str, Tensor]:
    """Freshly initialised ControlNet parts with no UNet counterpart, under ``control_model.*`` names.

    The hint encoder is built exactly as ``ControlNet.__init__`` builds it, under ``seed`` (the global RNG is
    restored afterwards); every zero convolution is exactly zero. ``model`` may live on the meta device.
    """
    control = model.control_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            hint = build_hint_encoder(control.control_config.hint_encoder, control.control_config.hint_channels,
                                      control.unet_config.model_channels)
    out = {f"{CONTROL_PREFIX}input_hint_block.{k}": v.detach() for k, v in hint.state_dict().items()}
    for name, value in control.state_dict().items():
        if name.startswith(("zero_convs.", "middle_block_out.")):
            out[CONTROL_PREFIX + name] = torch.zeros(value.shape, dtype=value.dtype)
    return out


@dataclass
class AddControlReport:
    """What ``add_control`` did with each key (names, in checkpoint order)."""

    copied: list[str] = field(default_factory=list)  # control_model.* copied from the UNet
    initialised: list[str] = field(default_factory=list)  # hint encoder + zero convs
    carried: list[str] = field(default_factory=list)  # base weights kept as they are
    derived: list[str] = field(default_factory=list)  # absent from the base, computed from the config
    ignored: list[str] = field(default_factory=list)  # base keys the model does not use
    cast: int = 0  # tensors converted to the model's dtype

    def summary(self) -> str:
        parts = [f"{len(self.copied)} control keys copied from the UNet",
                 f"{len(self.initialised)} newly initialised", f"{len(self.carried)} base keys carried over"]
        if self.derived:
            parts.append(f"{len(self.derived)} derived from the config")
        parts.append(f"{len(self.ignored)} ignored")
        if self.cast:
            parts.append(f"{self.cast} cast to the model dtype")
        return ", ".join(parts)


def _check_is_sd(base: Mapping[str, Tensor], where: str) -> None:
    for prefix in SD_PREFIXES:
        if not any(k.startswith(prefix) for k in base):
            found = sorted({_prefix_of(k) for k in base})
            raise CheckpointKeyError(f"{where}: not a Stable Diffusion 1.x checkpoint: no '{prefix}*' keys "
                                     f"(it holds {_names(found)})")


def add_control(base: Mapping[str, Tensor], expected: Mapping[str, Tensor], fresh: Mapping[str, Tensor],
                *, where: str = "base checkpoint") -> tuple[dict[str, Tensor], AddControlReport]:
    """Build the initial ControlNet checkpoint from an SD base state dict.

    ``expected`` is the target model's state dict (meta tensors are fine: keys, shapes, dtypes); ``fresh`` holds
    ``fresh_control_weights``. Every ``control_model.X`` comes from ``model.diffusion_model.X`` of the base when
    the UNet has it, else from ``fresh``. Keys the base lacks but the config determines (schedule buffers,
    ``position_ids``) are derived; ``model_ema.*`` and keys outside the model's networks are ignored. Missing
    weights, keys of another geometry and wrong shapes raise ``CheckpointKeyError`` with one line.
    """
    _check_is_sd(base, where)
    if any(k.startswith(CONTROL_PREFIX) for k in base):
        raise CheckpointKeyError(f"{where}: already holds 'control_model.*' keys (an existing ControlNet "
                                 "checkpoint?); pass a plain Stable Diffusion checkpoint")
    report = AddControlReport()
    own_prefixes = SD_PREFIXES + (TEXT_PREFIX,)
    stray = [k for k in base if k not in expected and k.startswith(own_prefixes)]
    if stray:
        raise CheckpointKeyError(f"{where}: {len(stray)} keys do not exist in the model of the config's geometry "
                                 f"({_names(stray)}); is --config the right one for this checkpoint?")
    report.ignored = [k for k in base if k not in expected]
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    wrong: dict[str, str] = {}  # by source key: a UNet tensor copied into control_model is reported once
    for key, like in expected.items():
        if key.startswith(CONTROL_PREFIX):
            source = UNET_PREFIX + key[len(CONTROL_PREFIX):]
            if source in expected:
                if source not in base:
                    missing.append(source)
                    continue
                value, bucket = base[source], report.copied
            elif key in fresh:
                value, bucket = fresh[key], report.initialised
            else:
                raise CheckpointKeyError(f"no source for {key}: neither {source} nor a fresh initialisation")
        elif key in base:
            value, bucket = base[key], report.carried
        elif not like.is_meta:  # a buffer the config computes (the diffusion schedule)
            value, bucket = like, report.derived
        elif key.endswith(OPTIONAL_SUFFIXES):
            value, bucket = torch.arange(like.shape[-1], dtype=like.dtype).reshape(like.shape), report.derived
        else:
            missing.append(key)
            continue
        if tuple(value.shape) != tuple(like.shape):
            name = source if bucket is report.copied else key
            wrong[name] = f"{name}: checkpoint {list(value.shape)}, config expects {list(like.shape)}"
            continue
        value, cast = _cast_like(value, like)
        report.cast += cast
        out[key] = value
        bucket.append(key)
    if wrong:
        raise CheckpointKeyError(f"{where}: {len(wrong)} tensors have the wrong shape for this config "
                                 f"({_names(list(wrong.values()), 3)}); is --config the right one for this "
                                 "checkpoint?")
    if missing:
        raise CheckpointKeyError(f"{where}: {len(missing)} keys missing, first under '{_prefix_of(missing[0])}' "
                                 f"({_names(missing)}); is --config the right one for this checkpoint?")
    return out, report


def training_to_model_keys(state: Mapping[str, Tensor], *, module_prefix: str = "net.",
                           where: str = "training checkpoint") -> dict[str, Tensor]:
    """A training checkpoint's state (LightningModule names) → the model's own names (the original layout).

    Strips the LightningModule attribute prefix (``net.``) and maps the text tower from open_clip's layout
    (``cond_stage_model.text.*``, as trained) to SD1.5's (``cond_stage_model.transformer.text_model.*``, with
    ``position_ids``). Keys already in the original layout pass through unchanged.
    """
    outside = [k for k in state if not k.startswith(module_prefix)]
    if outside:
        raise CheckpointKeyError(f"{where}: {len(outside)} keys outside the model '{module_prefix}*' "
                                 f"({_names(outside)}); not a checkpoint of this framework's training?")
    plain = {k[len(module_prefix):]: v for k, v in state.items()}
    text = {k[len(TEXT_PREFIX):]: v for k, v in plain.items()
            if k.startswith(TEXT_PREFIX) and not k.startswith(TEXT_PREFIX + SD15_TEXT_PREFIX)}
    out = {k: v for k, v in plain.items() if not (k.startswith(TEXT_PREFIX) and k[len(TEXT_PREFIX):] in text)}
    if text:
        try:
            mapped = open_clip_to_sd15(text, position_ids=True)
        except ValueError as exc:
            raise CheckpointKeyError(f"{where}: text encoder keys: {exc}") from None
        out.update({TEXT_PREFIX + SD15_TEXT_PREFIX + k: v for k, v in mapped.items()})
    return out


def to_float32(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Floating tensors as float32 (bf16/fp16 frozen weights of a mixed-precision run); returns the cast count."""
    out, cast = {}, 0
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float32:
            value, cast = value.float(), cast + 1
        out[key] = value
    return out, cast


def _is_rounded_copy(new: Tensor, base: Tensor) -> bool:
    """``new`` is ``base`` rounded to bf16 or fp16 and back: a frozen weight as a mixed-precision run stores it."""
    if not (new.is_floating_point() and base.dtype == torch.float32 and new.dtype == torch.float32):
        return False
    head_new, head_base = new.flatten()[:64], base.flatten()[:64]  # cheap rejection of real updates first
    return any(torch.equal(head_base.to(low).float(), head_new) and torch.equal(base.to(low).float(), new)
               for low in (torch.bfloat16, torch.float16))


@dataclass
class MergeReport:
    replaced: list[str] = field(default_factory=list)  # trained keys whose value differs from the base
    same: list[str] = field(default_factory=list)  # trained keys equal to the base (e.g. frozen weights)
    rounded: list[str] = field(default_factory=list)  # trained keys = the base rounded to bf16/fp16: base kept
    kept: int = 0  # base keys the trained file does not hold
    dropped: list[str] = field(default_factory=list)  # ignored base keys (model_ema.*) left out of the output

    def summary(self) -> str:
        groups: dict[str, int] = {}
        for key in self.replaced:
            groups[_prefix_of(key)] = groups.get(_prefix_of(key), 0) + 1
        detail = ", ".join(f"{n} {p}" for p, n in groups.items())
        text = f"{len(self.replaced)} keys replaced" + (f" ({detail})" if detail else "")
        text += f", {len(self.same)} trained keys equal to the base, {self.kept} base keys kept"
        if self.rounded:
            text += f", {len(self.rounded)} rounded copies of base weights ignored (exact base values kept)"
        return text + (f", {len(self.dropped)} ignored base keys dropped" if self.dropped else "")


def merge_weights(base: Mapping[str, Tensor], trained: Mapping[str, Tensor], *, base_name: str = "base",
                  trained_name: str = "trained") -> tuple[dict[str, Tensor], MergeReport]:
    """Overlay ``trained`` on ``base``: every trained key must exist in the base with the same shape.

    Trained values are cast to the base's dtype; a trained value that is exactly the base value rounded to bf16 /
    fp16 (a frozen weight of a mixed-precision run) keeps the base value; ``model_ema.*`` base keys are dropped
    (inference never uses them). Raises ``CheckpointKeyError`` naming unknown keys or wrong shapes.
    """
    unknown = [k for k in trained if k not in base]
    if unknown:
        hint = ("; --base has no ControlNet: pass the tool_add_control.py output" if
                any(k.startswith(CONTROL_PREFIX) for k in unknown) and
                not any(k.startswith(CONTROL_PREFIX) for k in base) else "")
        raise CheckpointKeyError(f"{trained_name}: {len(unknown)} keys do not exist in {base_name} "
                                 f"({_names(unknown)}){hint}")
    wrong = [f"{k}: {list(v.shape)} vs {list(base[k].shape)}" for k, v in trained.items()
             if tuple(v.shape) != tuple(base[k].shape)]
    if wrong:
        raise CheckpointKeyError(f"{trained_name}: {len(wrong)} tensors differ in shape from {base_name} "
                                 f"({_names(wrong, 3)})")
    report = MergeReport()
    merged: dict[str, Tensor] = {}
    for key, value in base.items():
        if key.startswith(IGNORED_PREFIXES):
            report.dropped.append(key)
            continue
        if key in trained:
            new, _ = _cast_like(trained[key], value)
            if torch.equal(new, value):
                report.same.append(key)
            elif _is_rounded_copy(new, value):
                # A bf16/fp16 run keeps frozen weights in low precision; the base holds their exact values.
                report.rounded.append(key)
                new = value
            else:
                report.replaced.append(key)
            merged[key] = new
        else:
            report.kept += 1
            merged[key] = value
    return merged, report


def check_against_model(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str) -> KeyReport:
    """Strict key/shape check of a full checkpoint against the model (``position_ids`` optional)."""
    report = compare_keys(expected, state, ignore_prefixes=IGNORED_PREFIXES, ignore_suffixes=OPTIONAL_SUFFIXES)
    report.raise_if_bad(f"{where} does not load strictly into the model of this config")
    return report


def select(state: Mapping[str, Tensor], names: Iterable[str]) -> dict[str, Tensor]:
    """The entries of ``state`` named in ``names`` (all must exist)."""
    names = list(names)
    missing = [n for n in names if n not in state]
    if missing:
        raise CheckpointKeyError(f"{len(missing)} keys missing ({_names(missing)})")
    return {n: state[n] for n in names}


@dataclass
class SDWeights:
    """An SD1.x base in the original layout, and what it was read from."""

    state: dict[str, Tensor]
    layout: str  # "diffusers folder" or "single file (.safetensors)", "single file (.ckpt)", ...
    files: list[Path]  # every weight file read (a folder's provenance digests them)
    geometry: SDGeometry | None = None  # what a diffusers folder's config files say (single files carry none)
    notes: list[str] = field(default_factory=list)  # what was done to reach the plain layout


_EMA = "model_ema."
_EMA_SCALARS = (_EMA + "decay", _EMA + "num_updates")
_SD15_TEXT = TEXT_PREFIX + SD15_TEXT_PREFIX


def normalize_single_file(state: dict[str, Tensor], *, expected: Mapping[str, Any] | None = None,
                          use_ema: bool = False, where: str = "checkpoint") -> list[str]:
    """Bring a single-file SD state dict to the plain layout, in place; returns notes on what it changed.

    The UNet's EMA copy (``model_ema.*``, the original's dot-less names: ``model_ema.diffusion_modelout0weight``) is
    taken when the file holds no ``model.diffusion_model.*`` or with ``use_ema``; its names are restored against
    ``expected`` (the model's keys; the file's own UNet keys when None). Text keys without ``text_model.`` (older
    transformers) get it; 2-D VAE attention weights (a linear save) get their 1×1 dimensions.
    """
    notes = []
    if not any(k.startswith((*SD_PREFIXES, _EMA)) for k in state) and any(
            k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.", "encoder.layers.")) for k in state):
        raise CheckpointKeyError(f"{where}: holds one diffusers/transformers network ({_names(sorted(state), 3)}), "
                                 f"not a whole Stable Diffusion checkpoint: pass the folder with {MODEL_INDEX}")
    ema = [k for k in state if k.startswith(_EMA) and k not in _EMA_SCALARS]
    has_unet = any(k.startswith(UNET_PREFIX) for k in state)
    if ema and (use_ema or not has_unet):
        names = [k for k in (state if expected is None else expected) if k.startswith(UNET_PREFIX)]
        flat = {_EMA + k[len("model."):].replace(".", ""): k for k in names}
        if not names or len(flat) != len(names):
            raise CheckpointKeyError(f"{where}: holds the UNet only as its EMA copy (model_ema.*), whose names can be "
                                     "restored only against the model's keys")
        missing = [k for k in flat if k not in state]
        if missing:
            raise CheckpointKeyError(f"{where}: the EMA copy (model_ema.*) lacks {len(missing)} of the model's "
                                     f"{len(flat)} UNet tensors ({_names(missing)}); is --config the right one?")
        for flat_key, key in flat.items():
            state[key] = state.pop(flat_key)
        notes.append(f"UNet from the EMA copy (model_ema.*, {len(flat)} tensors" +
                     ("; the model.diffusion_model.* weights are not used)" if has_unet else "; the file holds no "
                      "model.diffusion_model.*)"))
    elif ema:
        notes.append(f"{len(ema)} model_ema.* tensors (the EMA copy of the UNet) ignored, as the original "
                     "tool_add_control.py does (--ema takes them instead)")
    old = TEXT_PREFIX + "transformer."
    legacy = [k for k in state if k.startswith(old) and not k.startswith(_SD15_TEXT)]
    for key in legacy:
        state[_SD15_TEXT + key[len(old):]] = state.pop(key)
    if legacy:
        notes.append(f"{len(legacy)} text-encoder keys without text_model. (older transformers) renamed")
    linear = [k for k, v in state.items() if k.startswith(FIRST_STAGE_PREFIX) and v.dim() == 2
              and re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", k)]
    for key in linear:
        state[key] = state[key][:, :, None, None]
    if linear:
        notes.append(f"{len(linear)} VAE attention weights stored as linear [C, C] given their 1×1 dimensions")
    return notes


def load_sd_weights(path: str | Path, *, expected: Mapping[str, Any] | None = None, unsafe_pickle: bool = False,
                    use_ema: bool = False) -> SDWeights:
    """An SD1.x base from a single file (``ldm.checkpoint.load_state_dict``'s formats and safe-loading rule, then
    ``normalize_single_file``) or a diffusers folder (``cldm.diffusers_import.from_diffusers``), in the original
    layout. Any other folder fails in ``ldm.checkpoint`` naming what it looks like (a ZeRO run: zero_to_fp32.py).
    Tensors keep their dtype (``add_control`` casts fp16 to the model's)."""
    path = Path(path)
    if path.is_dir() and (path / MODEL_INDEX).is_file():
        if use_ema:
            raise ValueError(f"{path}: --ema applies to single-file checkpoints; a diffusers folder holds one UNet")
        parts = from_diffusers(path, unsafe_pickle=unsafe_pickle)
        state = {UNET_PREFIX + k: v for k, v in parts.unet.items()}
        state.update({FIRST_STAGE_PREFIX + k: v for k, v in parts.vae.items()})
        state.update({_SD15_TEXT + k: v for k, v in parts.text_encoder.items()})
        if parts.geometry.schedule is not None:  # the 13 buffers an SD1.x single file carries, from scheduler/
            schedule = parts.geometry.schedule
            state.update(Schedule.from_config(schedule["beta_schedule"], schedule["timesteps"],
                                              schedule["linear_start"], schedule["linear_end"]).buffers())
        return SDWeights(state, "diffusers folder", parts.files, parts.geometry, parts.notes)
    state = load_state_dict(path, unsafe_pickle=unsafe_pickle)
    notes = normalize_single_file(state, expected=expected, use_ema=use_ema, where=str(path))
    return SDWeights(state, f"single file ({path.suffix.lower()})", [path], None, notes)
