"""Frozen CLIP text encoder of Stable Diffusion 1.5, built on open_clip's text tower.

SD1.5 conditions its UNet on the per-token last hidden state of OpenAI's CLIP ViT-L/14 text model (after the final
LayerNorm, B x 77 x 768; not the pooled/projected vector), computed with a causal mask and QuickGELU. The original
code (ldm's ``FrozenCLIPEmbedder``) runs transformers' ``CLIPTextModel``, so SD1.5 checkpoints store the weights in
transformers' layout under ``cond_stage_model.transformer.text_model.*``. Here the same network is open_clip's
``TextTransformer`` (random init; weights only ever come from a checkpoint, never from a download) and the two
functions ``sd15_to_open_clip`` / ``open_clip_to_sd15`` map between the layouts exactly (q, k, v are concatenated
into open_clip's fused ``in_proj``). Tokenisation uses open_clip's bundled OpenAI BPE vocabulary but pads with the
end-of-text id 49407, as SD1.5's transformers tokenizer (``pad_token = "<|endoftext|>"``) does; open_clip itself
pads with 0, which would change every padded position of the conditioning.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

from ldm.settings import BOS_TOKEN_ID, EOS_TOKEN_ID, TextEncoderConfig

import torch
from torch import Tensor, nn

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "SD15_TEXT_PREFIX",
    "FrozenCLIPTextEncoder",
    "TextEncoderConfig",
    "open_clip_to_sd15",
    "sd15_to_open_clip",
    "tokenize",
]

SD15_TEXT_PREFIX = "cond_stage_model.transformer.text_model."  # where SD1.5 checkpoints keep this encoder
_TOWER = "text."  # our submodule name, as in open_clip's CustomTextCLIP


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer():  # open_clip imported here, not at module import: configs and --help stay fast
    # Reading and parsing the bundled BPE merges takes ~0.5 s; share one instance across all encoders.
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenize(prompts: Sequence[str], context_length: int = 77) -> Tensor:
    """CLIP BPE ids as SD1.5 makes them: [BOS, tokens..., EOS, EOS...], truncated keeping EOS last. LongTensor[B, L]."""
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer = _bpe_tokenizer()
    out = torch.full((len(prompts), context_length), EOS_TOKEN_ID, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"tokenize: prompt {row} is {type(prompt).__name__}, expected str")
        # BOS + at most L-2 text tokens + EOS: the same truncation as transformers' CLIPTokenizer(truncation=True).
        ids = [BOS_TOKEN_ID, *tokenizer.encode(prompt)[: context_length - 2], EOS_TOKEN_ID]
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Weight mapping: transformers layout (keys relative to SD15_TEXT_PREFIX) <-> this module's state_dict keys.
# ---------------------------------------------------------------------------------------------------------------
_GLOBAL_SD15_TO_OURS = {
    "embeddings.token_embedding.weight": _TOWER + "token_embedding.weight",
    "embeddings.position_embedding.weight": _TOWER + "positional_embedding",
    "final_layer_norm.weight": _TOWER + "ln_final.weight",
    "final_layer_norm.bias": _TOWER + "ln_final.bias",
}
# Per-layer keys that map one-to-one (q/k/v are handled separately: they are fused in open_clip).
_LAYER_SD15_TO_OURS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
_QKV = ("q", "k", "v")  # order of open_clip's (= nn.MultiheadAttention's) fused in_proj rows
_POSITION_IDS = "embeddings.position_ids"  # an int64 arange buffer older checkpoints carry; derivable, so dropped
_SD15_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OURS_LAYER_RE = re.compile(re.escape(_TOWER) + r"transformer\.resblocks\.(\d+)\.(.+)")


def _sd15_layer_suffixes() -> list[str]:
    qkv = [f"self_attn.{p}_proj.{kind}" for kind in ("weight", "bias") for p in _QKV]
    return [*_LAYER_SD15_TO_OURS, *qkv]


def _ours_layer_suffixes() -> list[str]:
    return [*_LAYER_SD15_TO_OURS.values(), "attn.in_proj_weight", "attn.in_proj_bias"]


def _check_keys(found: set[str], expected: set[str], unexpected: list[str], what: str) -> None:
    """Raise one ValueError line naming unexpected, then missing keys (at most 5 of each shown)."""
    if unexpected:
        shown = ", ".join(repr(k) for k in sorted(unexpected)[:5])
        more = f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        # The commonest mistake is passing full checkpoint keys; say which prefix to strip.
        prefixes = {k[: len(k) - len(e)] for k in unexpected for e in expected if k.endswith("." + e)}
        hint = f"; strip the prefix {min(prefixes, key=len)!r} first" if prefixes else ""
        raise ValueError(f"{what}: unexpected key(s) {shown}{more}{hint}")
    missing = sorted(expected - found)
    if missing:
        shown = ", ".join(repr(k) for k in missing[:5])
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ValueError(f"{what}: missing key(s) {shown}{more}")


def _layer_count(indices: set[int]) -> int:
    # The checkpoint does not state its depth; infer it from the highest index and demand every layer below it.
    return max(indices) + 1 if indices else 0


def sd15_to_open_clip(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an SD1.5 text-encoder state dict (transformers layout, keys relative to ``SD15_TEXT_PREFIX``, e.g.
    ``embeddings.token_embedding.weight``) to ``FrozenCLIPTextEncoder`` keys. ``embeddings.position_ids`` is
    accepted and ignored; any other unknown key, or a missing one, raises ValueError."""
    what = "sd15_to_open_clip (SD1.5 text-encoder state dict)"
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    unexpected: list[str] = []
    layer_ids: set[int] = set()
    for key, value in sd.items():
        if key == _POSITION_IDS:
            continue
        if key in _GLOBAL_SD15_TO_OURS:
            out[_GLOBAL_SD15_TO_OURS[key]] = value
            continue
        match = _SD15_LAYER_RE.fullmatch(key)
        suffix = match.group(2) if match else ""
        if match is None or suffix not in _sd15_layer_suffixes():
            unexpected.append(key)
            continue
        layer = int(match.group(1))
        layer_ids.add(layer)
        if suffix in _LAYER_SD15_TO_OURS:
            out[f"{_TOWER}transformer.resblocks.{layer}.{_LAYER_SD15_TO_OURS[suffix]}"] = value
        else:  # self_attn.{q,k,v}_proj.{weight,bias}
            proj, kind = suffix.split(".")[1:]
            qkv.setdefault((layer, kind), {})[proj[0]] = value
    expected = set(_GLOBAL_SD15_TO_OURS) | {
        f"encoder.layers.{i}.{s}" for i in range(_layer_count(layer_ids)) for s in _sd15_layer_suffixes()
    }
    _check_keys(set(sd) - {_POSITION_IDS}, expected, unexpected, what)
    for (layer, kind), parts in qkv.items():
        out[f"{_TOWER}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[p] for p in _QKV], 0)
    return out


def open_clip_to_sd15(sd: Mapping[str, Tensor], position_ids: bool = False) -> dict[str, Tensor]:
    """Inverse of ``sd15_to_open_clip``: ``FrozenCLIPTextEncoder`` keys -> transformers layout (relative keys).
    ``position_ids=True`` also writes the ``embeddings.position_ids`` buffer (int64 ``arange``, shape 1 x L) that the
    original SD1.5 checkpoints carry. Unknown or missing keys raise ValueError."""
    what = "open_clip_to_sd15 (FrozenCLIPTextEncoder state dict)"
    ours_to_sd15 = {v: k for k, v in _GLOBAL_SD15_TO_OURS.items()}
    layer_map = {v: k for k, v in _LAYER_SD15_TO_OURS.items()}
    out: dict[str, Tensor] = {}
    unexpected: list[str] = []
    layer_ids: set[int] = set()
    for key, value in sd.items():
        if key in ours_to_sd15:
            out[ours_to_sd15[key]] = value
            continue
        match = _OURS_LAYER_RE.fullmatch(key)
        suffix = match.group(2) if match else ""
        if match is None or suffix not in _ours_layer_suffixes():
            unexpected.append(key)
            continue
        layer = int(match.group(1))
        layer_ids.add(layer)
        if suffix in layer_map:
            out[f"encoder.layers.{layer}.{layer_map[suffix]}"] = value
        else:  # attn.in_proj_{weight,bias}: rows are [q; k; v]
            kind = suffix.rsplit("_", 1)[1]
            # clone(): chunks are views of one storage, which safetensors refuses to save as separate tensors.
            for proj, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"encoder.layers.{layer}.self_attn.{proj}_proj.{kind}"] = part.clone()
    expected = set(ours_to_sd15) | {
        f"{_TOWER}transformer.resblocks.{i}.{s}" for i in range(_layer_count(layer_ids)) for s in _ours_layer_suffixes()
    }
    _check_keys(set(sd), expected, unexpected, what)
    if position_ids:
        pos = out["embeddings.position_embedding.weight"]
        out[_POSITION_IDS] = torch.arange(pos.shape[0], dtype=torch.long, device=pos.device).unsqueeze(0)
    return out


class FrozenCLIPTextEncoder(nn.Module):
    """SD1.5's frozen text conditioning: prompts -> CLIP last hidden state (B x context_length x width).

    The network is open_clip's ``TextTransformer`` stored as ``self.text`` (state-dict keys ``text.*``), without
    projection and pooling. It is built frozen (no gradients, eval mode; ``train()`` keeps it in eval) because SD1.5
    and ControlNet never train it.
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        from open_clip.transformer import QuickGELU, TextTransformer  # here: importing this module stays fast

        self.config = config
        self.text = TextTransformer(
            context_length=config.context_length,
            vocab_size=config.vocab_size,
            width=config.width,
            heads=config.heads,
            layers=config.layers,
            output_dim=None,  # no text_projection: SD1.5 uses the token states, not CLIP's joint embedding
            pool_type="none",  # pooling is unused, so skip the gather
            output_tokens=True,  # forward returns (pooled, tokens); tokens are ln_final(x) for every position
            act_layer=QuickGELU if config.quick_gelu else nn.GELU,
        )
        self.freeze()

    def freeze(self) -> None:
        """Disable gradients and switch to eval mode (no dropout exists, but eval keeps the intent explicit)."""
        for param in self.parameters():
            param.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FrozenCLIPTextEncoder:
        # Lightning calls model.train() on the whole LDM each epoch; a frozen encoder must stay in eval mode
        # (ldm's original replaces .train with a no-op for the same reason).
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.text.token_embedding.weight.device

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        """EOS-padded CLIP ids, LongTensor[B, context_length] on the CPU."""
        return tokenize(prompts, self.config.context_length)

    def forward(self, tokens: Tensor) -> Tensor:
        """Token ids [B, context_length] -> last hidden state after ln_final, [B, context_length, width]."""
        # open_clip applies its full-length causal mask unsliced, so shorter sequences are not supported.
        if tokens.dim() != 2 or tokens.shape[1] != self.config.context_length:
            raise ValueError(
                f"FrozenCLIPTextEncoder.forward: tokens of shape {tuple(tokens.shape)}, expected "
                f"[batch, {self.config.context_length}] (use .tokenize())"
            )
        _, hidden = self.text(tokens)
        return hidden

    def encode(self, prompts: Sequence[str]) -> Tensor:
        """Tokenize and encode on this module's device: [B, context_length, width]."""
        return self(self.tokenize(prompts).to(self.device))

    def load_sd15_state_dict(self, sd: Mapping[str, Tensor]) -> None:
        """Load SD1.5 text-encoder weights (transformers layout, keys relative to ``SD15_TEXT_PREFIX``)."""
        converted = sd15_to_open_clip(sd)
        own = self.state_dict()
        # Check depth and shapes here so a wrong checkpoint fails with one line instead of torch's multi-line report.
        depth = len({m.group(1) for m in map(_OURS_LAYER_RE.fullmatch, converted) if m})
        if depth != self.config.layers:
            raise ValueError(f"load_sd15_state_dict: checkpoint has {depth} layers, this encoder {self.config.layers}")
        _check_keys(set(converted), set(own), sorted(set(converted) - set(own)), "load_sd15_state_dict")
        for key, value in converted.items():
            if value.shape != own[key].shape:
                raise ValueError(
                    f"load_sd15_state_dict: {key!r} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)} "
                    f"(config {self.config})"
                )
        self.load_state_dict(converted, strict=True)

    def sd15_state_dict(self, position_ids: bool = False) -> dict[str, Tensor]:
        """This encoder's weights in SD1.5's transformers layout (keys relative to ``SD15_TEXT_PREFIX``)."""
        return open_clip_to_sd15(self.state_dict(), position_ids=position_ids)
