"""Spatial transformer of the Stable Diffusion UNet (self- and cross-attention over latent pixels).

Follows the latent-diffusion ``SpatialTransformer`` / ``BasicTransformerBlock`` / ``CrossAttention`` layout of
Rombach et al. 2022 so that SD1.5 state-dict names (``norm``, ``proj_in``, ``transformer_blocks.N.attn1.to_q`` …,
``proj_out``) load unchanged. Attention itself is ``F.scaled_dot_product_attention``, which picks a fused kernel
(flash / memory-efficient) where the device has one and is mathematically ``softmax(QKᵀ/√d)V``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` (the "zero convolution" initialisation of ControlNet / LDM outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Group count for GroupNorm: 32 as in SD, or the largest divisor ≤ 32 for tiny widths (never used at SD1.5)."""
    if channels <= 0:
        raise ValueError(f"GroupNorm needs a positive channel count, got {channels}")
    return next(g for g in range(min(max_groups, channels), 0, -1) if channels % g == 0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back, as the LDM UNet does (stable under bf16/fp16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        # Weights in float32 too: under DeepSpeed's bf16 mode they are bf16, and group_norm refuses mixed dtypes.
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    return GroupNorm32(group_norm_groups(channels), channels, eps=eps)


class CrossAttention(nn.Module):
    """Multi-head attention; keys/values come from ``context`` (cross) or from ``x`` itself (self)."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(f(s), "b n (h d) -> b h n d", h=self.heads)
                   for f, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020), the SD feed-forward input layer."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the text context, gated feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the H·W latent pixels with a residual around it; ``proj_out`` starts at zero."""

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int = 1, context_dim: int | None = None,
                 dropout: float = 0.0, use_linear: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-6)
        # SD1.5 uses 1×1 convolutions here; SD2 switched to linear layers (use_linear_in_transformer).
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout) for _ in range(depth))
        proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)
        self.proj_out = zero_module(proj_out)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        _, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c")
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        # Contiguous (as the original): the rearranged view has channels-last strides, which would spread through
        # every later conv, and torch's CPU GroupNorm backward crashes (segfault) on channels-last inputs.
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps, [cos | sin] halves as in LDM."""
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period)) * torch.arange(half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs.to(timesteps.device)[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
