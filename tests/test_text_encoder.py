"""Tests for ldm.text_encoder: SD1.5 key/shape layout (meta device), exact parity with transformers' CLIPTextModel,
SD1.5 tokenisation (EOS padding, truncation) and the weight-mapping round trip."""

from __future__ import annotations

from typing import Any

import ldm  # noqa: F401  (torchvision shim before open_clip / transformers)
from ldm.text_encoder import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    SD15_TEXT_PREFIX,
    FrozenCLIPTextEncoder,
    TextEncoderConfig,
    open_clip_to_sd15,
    sd15_to_open_clip,
)

import pytest
import torch

PROMPTS = [
    "a photo of a cat",
    "",
    "Colonoscopy image, a polyp with a red, Irregular surface!",
    " ".join(["cat"] * 100),  # 100 single-BPE-token words: longer than 77, truncated
]


@pytest.fixture(scope="module")
def tiny() -> FrozenCLIPTextEncoder:
    torch.manual_seed(0)
    return FrozenCLIPTextEncoder(TextEncoderConfig.tiny())


@pytest.fixture(scope="module")
def hf_text_model_factory():
    transformers = pytest.importorskip("transformers")

    def build(attn_implementation: str):
        config = transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            eos_token_id=EOS_TOKEN_ID,
            pad_token_id=EOS_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            attn_implementation=attn_implementation,  # transformers 5 defaults to sdpa; both must be causal
        )
        torch.manual_seed(123)
        model = transformers.CLIPTextModel(config).eval()
        assert model.config._attn_implementation == attn_implementation
        return model

    return build


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # Non-trivial LayerNorm affine parameters and biases, so a swapped ln_1/ln_2 or q/k/v would show.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            offset = 0.5 if param.dim() == 1 else 0.0  # LayerNorm gains / biases away from 1 / 0
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + offset)


def test_sd15_keys_and_shapes_match_manifest_on_meta(reference_manifest: dict[str, Any]) -> None:
    manifest = reference_manifest["keys"]
    optional = {SD15_TEXT_PREFIX + "embeddings.position_ids"}
    expected = {k: tuple(v[0]) for k, v in manifest.items() if k.startswith("cond_stage_model.") and k not in optional}
    assert len(expected) == 196
    with torch.device("meta"):
        model = FrozenCLIPTextEncoder(TextEncoderConfig())
    got = {SD15_TEXT_PREFIX + k: tuple(v.shape) for k, v in open_clip_to_sd15(model.state_dict()).items()}
    assert got == expected
    # With the optional buffer the export covers every cond_stage_model key, dtype included.
    full = open_clip_to_sd15(model.state_dict(), position_ids=True)
    assert full["embeddings.position_ids"].dtype == torch.int64
    assert list(full["embeddings.position_ids"].shape) == manifest[SD15_TEXT_PREFIX + "embeddings.position_ids"][0]
    # Frozen by construction, and train() does not unfreeze it.
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not model.text.training


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_parity_with_transformers_clip_text_model(hf_text_model_factory, attn_implementation: str) -> None:
    hf = hf_text_model_factory(attn_implementation)
    _randomise(hf, seed=1)
    # transformers 5 has no "text_model." level in CLIPTextModel's state dict; older releases (and SD1.5) do.
    hf_sd = {k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}
    assert all(k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm.")) for k in hf_sd)

    ours = FrozenCLIPTextEncoder(TextEncoderConfig.tiny())
    ours.load_sd15_state_dict(hf_sd)
    tokens = ours.tokenize(PROMPTS)
    with torch.no_grad():
        reference = hf(input_ids=tokens).last_hidden_state
        got = ours(tokens)
    assert got.shape == (len(PROMPTS), 77, 32)
    assert (got - reference).abs().max().item() <= 1e-5
    # encode() is tokenize + forward; batch items are independent (no cross-sample leakage).
    assert torch.equal(ours.encode(PROMPTS), got)
    assert torch.allclose(ours.encode(PROMPTS[:1])[0], got[0], atol=1e-6)
    # Causality: changing a later token leaves every earlier position unchanged and changes the later ones.
    edited = tokens.clone()
    edited[0, 3] = 1000
    with torch.no_grad():
        out_edit = ours(edited)
    assert torch.allclose(out_edit[0, :3], got[0, :3], atol=1e-6)
    assert not torch.allclose(out_edit[0, 3:], got[0, 3:], atol=1e-3)
    with pytest.raises(ValueError, match=r"tokens of shape \(2, 10\), expected \[batch, 77\]"):
        ours(tokens[:2, :10])


def test_tokenize_pads_with_eos_and_truncates(tiny) -> None:
    tokens = tiny.tokenize(PROMPTS)
    assert tokens.dtype == torch.long and tokens.shape == (len(PROMPTS), 77)
    assert (tokens[:, 0] == BOS_TOKEN_ID).all()
    # OpenAI CLIP ids for "a photo of a cat", then EOS padding (open_clip alone would pad with 0).
    assert tokens[0, :7].tolist() == [BOS_TOKEN_ID, 320, 1125, 539, 320, 2368, EOS_TOKEN_ID]
    assert (tokens[0, 6:] == EOS_TOKEN_ID).all()
    assert tokens[1].tolist() == [BOS_TOKEN_ID] + [EOS_TOKEN_ID] * 76
    # 100 x "cat": BOS + the first 75 word tokens + EOS, no padding left.
    assert tokens[3].tolist() == [BOS_TOKEN_ID] + [2368] * 75 + [EOS_TOKEN_ID]
    assert (tokens != 0).all()


def test_sd15_round_trip_and_key_errors(tiny) -> None:
    sd15 = tiny.sd15_state_dict(position_ids=True)
    back = open_clip_to_sd15(sd15_to_open_clip(sd15), position_ids=True)
    assert back.keys() == sd15.keys()
    assert all(torch.equal(back[k], sd15[k]) for k in sd15)
    # Loading the exported weights into a differently initialised encoder reproduces the outputs exactly.
    torch.manual_seed(99)
    other = FrozenCLIPTextEncoder(TextEncoderConfig.tiny())
    other.load_sd15_state_dict(sd15)
    tokens = tiny.tokenize(PROMPTS[:2])
    assert torch.equal(other(tokens), tiny(tokens))
    # Exported q/k/v do not share storage (safetensors refuses shared tensors).
    ptrs = [v.untyped_storage().data_ptr() for k, v in sd15.items() if "_proj." in k]
    assert len(set(ptrs)) == len(ptrs)

    with pytest.raises(ValueError, match=r"unexpected key.*'encoder\.layers\.0\.bogus\.weight'"):
        sd15_to_open_clip({**sd15, "encoder.layers.0.bogus.weight": torch.zeros(1)})
    # Keys still carrying a checkpoint prefix: the message says which prefix to strip.
    with pytest.raises(ValueError, match=r"unexpected key.*'text_model\.embeddings\..*strip the prefix 'text_model\.'"):
        sd15_to_open_clip({"text_model." + k: v for k, v in sd15.items()})
    missing = {k: v for k, v in sd15.items() if k != "encoder.layers.1.self_attn.k_proj.bias"}
    with pytest.raises(ValueError, match=r"missing key.*'encoder\.layers\.1\.self_attn\.k_proj\.bias'"):
        sd15_to_open_clip(missing)
    with pytest.raises(ValueError, match=r"unexpected key.*'text\.text_projection'"):
        open_clip_to_sd15({**tiny.state_dict(), "text.text_projection": torch.zeros(32, 32)})
    # A deeper or wider checkpoint fails with one line naming the key.
    with pytest.raises(ValueError, match=r"checkpoint has 3 layers, this encoder 2"):
        other.load_sd15_state_dict({**sd15, **{k.replace("layers.1.", "layers.2."): v for k, v in sd15.items()}})
    wide = dict(sd15, **{"final_layer_norm.weight": torch.ones(64)})
    with pytest.raises(ValueError, match=r"'text\.ln_final\.weight' has shape \(64,\), expected \(32,\)"):
        other.load_sd15_state_dict(wide)
