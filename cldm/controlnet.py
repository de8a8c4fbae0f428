"""ControlNet (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet encoder driven by a hint image.

The geometry is derived from the UNet's own ``UNetConfig`` (no duplicated YAML): the same input blocks and middle
block, one zero-initialised 1×1 "zero convolution" per input block (12 at SD1.5) and one after the middle block
(``middle_block_out``), so the number of residuals always equals what the UNet decoder consumes (13 at SD1.5).
The hint encoder output is added to the first input block's output. Parameter names are the original's
(``control_model.*`` in checkpoints).
"""

from __future__ import annotations

from ldm.attention import timestep_embedding, zero_module
from ldm.unet import TimestepEmbedSequential, UNetConfig, build_encoder, build_time_embed

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cldm.hint import build_hint_encoder
from cldm.settings import HINT_DOWNSAMPLE, ControlConfig


class ControlNet(nn.Module):
    """``forward(x, hint, t, context)`` → the list of control residuals (input blocks in order, then middle)."""

    def __init__(self, unet: UNetConfig, control: ControlConfig):
        super().__init__()
        self.unet_config = unet
        self.control_config = control
        self.time_embed = build_time_embed(unet)
        self.input_hint_block = build_hint_encoder(control.hint_encoder, control.hint_channels, unet.model_channels)
        self.input_blocks, self.middle_block, skips = build_encoder(unet)
        self.zero_convs = nn.ModuleList(
            TimestepEmbedSequential(zero_module(nn.Conv2d(c, c, 1))) for c in skips)
        self.middle_block_out = TimestepEmbedSequential(zero_module(nn.Conv2d(skips[-1], skips[-1], 1)))
        self.set_gradient_checkpointing(unet.use_checkpoint)

    @property
    def num_residuals(self) -> int:
        return len(self.zero_convs) + 1

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in backward: every block, and the hint encoder too. The original leaves the hint
        encoder out, yet at full hint resolution it stores the most: DHI keeps ≈ 275 MiB per sample at 384² (fp32),
        more than all checkpointed blocks together (``bench/hint_memory.py``)."""
        self.hint_checkpointing = enabled
        for module in self.modules():
            if isinstance(module, TimestepEmbedSequential):
                module.use_checkpoint = enabled

    def encode_hint(self, hint: Tensor) -> Tensor:
        if self.hint_checkpointing and torch.is_grad_enabled() and self.training:
            return checkpoint(self.input_hint_block, hint, use_reentrant=False)
        return self.input_hint_block(hint)

    def forward(self, x: Tensor, hint: Tensor | None, timesteps: Tensor, context: Tensor | None,
                hint_feature: Tensor | None = None) -> list[Tensor]:
        """Control residuals for latent ``x``. ``hint_feature`` = ``encode_hint(hint)`` computed beforehand (then
        ``hint`` may be None): the hint encoder depends on neither the timestep nor the prompt, so a sampler encodes
        each hint once per sampling call instead of once per step and guidance row (``ControlLDM.sample``)."""
        if hint_feature is None:
            expected = (x.shape[-2] * HINT_DOWNSAMPLE, x.shape[-1] * HINT_DOWNSAMPLE)
            if hint is None or tuple(hint.shape[-2:]) != expected:
                got = None if hint is None else tuple(hint.shape[-2:])
                raise ValueError(f"hint is {got} but the latent {tuple(x.shape[-2:])} needs a "
                                 f"{expected} hint ({HINT_DOWNSAMPLE}× the latent size)")
            hint_feature = self.encode_hint(hint)
        elif tuple(hint_feature.shape[-2:]) != tuple(x.shape[-2:]):
            raise ValueError(f"hint_feature is {tuple(hint_feature.shape[-2:])}, the latent {tuple(x.shape[-2:])}: "
                             "encode_hint of a hint 8× the latent size")
        emb = self.time_embed(timestep_embedding(timesteps, self.unet_config.model_channels).to(x.dtype))
        h = self.input_blocks[0](x, emb, context) + hint_feature
        outs = [self.zero_convs[0](h, emb, context)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            outs.append(zero_conv(h, emb, context))
        outs.append(self.middle_block_out(self.middle_block(h, emb, context), emb, context))
        scale = self.control_config.control_scale
        return outs if scale == 1.0 else [o * scale for o in outs]
