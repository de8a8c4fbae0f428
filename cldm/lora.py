"""LoRA adapters (through ``peft``) on the UNet decoder and optionally the ControlNet: parameter-efficient training.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3 and §4.1) keeps a weight ``W₀``
frozen and learns a low-rank update: ``h = W₀x + (α/r)·B A x`` with ``A ∈ ℝ^{r×k}`` (random init) and
``B ∈ ℝ^{d×r}`` (zero init, so training starts from the base model exactly). For a convolution peft uses ``A`` as a
conv with the base kernel (``r`` output channels) and ``B`` as a 1×1 conv, so ``ΔW = (α/r)·B·A`` over the flattened
kernels. Here it is the alternative to ``sd_locked: false``'s full decoder fine-tuning: the decoder's base weights
stay frozen, the adapters on its attention / feed-forward / convolution layers train, and the ControlNet trains in
full (or, with ``control: true``, through adapters on its encoder copy while its zero convolutions and hint encoder
train in full: they start at zero / have no base model to keep).

Names: peft renames a wrapped layer's weight ``X.weight`` to ``X.base_layer.weight`` and adds
``X.lora_A.default.weight`` / ``X.lora_B.default.weight``. Training state (ZeRO checkpoints, resume) keeps peft's
names; everything exported (``zero_to_fp32.py``) uses :func:`plain_names` — the original names plus
``X.lora_A.weight`` / ``X.lora_B.weight`` — and ``tool_merge_control.py`` folds those into ``X.weight``
(:func:`fold_lora`), so inference checkpoints are plain SD1.5 + ControlNet files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from cldm.settings import LoraSettings

# ControlNet parts with no counterpart in the base model (zero-initialised / new): they train in full under LoRA.
CONTROL_NEW_PARTS: tuple[str, ...] = ("zero_convs.", "middle_block_out.", "input_hint_block.")
ADAPTER = "default"
_RAW_TO_PLAIN = ((f".lora_A.{ADAPTER}.", ".lora_A."), (f".lora_B.{ADAPTER}.", ".lora_B."), (".base_layer.", "."))
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")


def target_pattern(prefixes: tuple[str, ...], targets: tuple[str, ...]) -> str:
    """The regex peft full-matches against module names: a target suffix inside one of the ``prefixes`` blocks."""
    heads = "|".join(re.escape(p) for p in prefixes)
    tails = "|".join(re.escape(t) for t in targets)
    return rf"(?:{heads})\.(?:.*\.)?(?:{tails})"


def _inject(module: nn.Module, settings: LoraSettings, prefixes: tuple[str, ...]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_pattern(prefixes, settings.targets))
    try:
        inject_adapter_in_model(config, module, adapter_name=ADAPTER)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(f"method.lora.targets {list(settings.targets)}: no layer of {type(module).__name__} "
                         f"matches ({str(exc).splitlines()[0][:160]})") from None
    # peft marks only its adapters trainable; restore what the caller had (configure_trainable decides later).
    for name, p in module.named_parameters():
        if name in trainable:
            p.requires_grad_(True)


def add_lora(unet: nn.Module, control: nn.Module | None, settings: LoraSettings) -> None:
    """Wrap the target layers of the UNet decoder (and of the ControlNet encoder copy when ``settings.control``)
    with LoRA adapters, in place. ``B`` starts at zero: the model computes exactly what it did before."""
    _inject(unet, settings, ("output_blocks",))
    if settings.control and control is not None:
        _inject(control, settings, ("input_blocks", "middle_block"))


def is_lora_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def configure_trainable(unet: nn.Module, control: nn.Module, settings: LoraSettings) -> None:
    """``requires_grad`` for LoRA training: the adapters, and the ControlNet in full or (``control``) its adapters,
    zero convolutions and hint encoder (its copy of the time embedding stays frozen then, like every base weight)."""
    unet.requires_grad_(False)
    for name, p in unet.named_parameters():
        p.requires_grad_(is_lora_name(name))
    if not settings.control:
        control.requires_grad_(True)
        return
    for name, p in control.named_parameters():
        p.requires_grad_(is_lora_name(name) or name.startswith(CONTROL_NEW_PARTS))


def plain_name(name: str) -> str:
    """peft's parameter name → the exported one (original names; ``X.lora_A.weight`` / ``X.lora_B.weight``)."""
    for raw, plain in _RAW_TO_PLAIN:
        name = name.replace(raw, plain)
    return name


def plain_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {plain_name(k): v for k, v in state.items()}


def has_lora(state: Mapping[str, Tensor]) -> bool:
    return any(_LORA_KEY.match(k) for k in state)


def lora_delta(a: Tensor, b: Tensor, scaling: float, shape: torch.Size) -> Tensor:
    """``(α/r)·B·A`` reshaped to the wrapped weight's shape (Linear: d×k; Conv2d: out×in×kh×kw, B a 1×1 conv)."""
    return (scaling * (b.flatten(1).double() @ a.flatten(1).double())).reshape(shape)


def fold_lora(trained: Mapping[str, Tensor], base: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """``trained`` with every ``X.lora_A/B.weight`` pair folded into ``X.weight`` (taken from ``trained`` when it has
    it, else from ``base``): ``W = W₀ + (α/r)·B·A``. Raises ValueError naming an unpaired or unknown adapter."""
    pairs: dict[str, dict[str, Tensor]] = {}
    out: dict[str, Tensor] = {}
    for key, value in trained.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["which"]] = value
        else:
            out[key] = value
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {module}: lora_A and lora_B must both be present, found {sorted(ab)}")
        key = f"{module}.weight"
        w0 = out.get(key, base.get(key))
        if w0 is None:
            raise ValueError(f"LoRA adapter {module}: its base weight {key} is in neither the trained nor the base "
                             "file")
        delta = lora_delta(ab["A"], ab["B"], scaling, w0.shape)
        out[key] = (w0.double() + delta).to(w0.dtype)
    return out
