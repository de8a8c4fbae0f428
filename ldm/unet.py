"""The Stable Diffusion UNet (ε-prediction network), with the control-residual interface ControlNet needs.

Layout and parameter names follow the latent-diffusion ``openaimodel.UNetModel`` (Rombach et al. 2022) at the
``cldm_v15.yaml`` settings, so SD1.5 weights (``model.diffusion_model.*``) load without renaming:
``time_embed``, ``input_blocks`` (encoder), ``middle_block``, ``output_blocks`` (decoder), ``out``.

The forward pass is split in two halves because ControlNet training treats them differently:
``encode`` (time embedding, input blocks, middle block) is never trained here and runs without autograd, exactly as the
original ``ControlledUnetModel``; ``decode`` adds the control residuals (middle output and every skip) and runs the
decoder. Splitting also lets the Siamese method compute the encoder once for both of its branches.

Gradient checkpointing uses ``torch.utils.checkpoint`` in its non-reentrant form: the reentrant form of the original
calls ``autograd.grad`` on every parameter and fails when some are frozen or passed in detached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ldm.attention import SpatialTransformer, normalization, timestep_embedding, zero_module
from ldm.settings import UNetConfig

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool = True):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Residual block conditioned on the time embedding (added after the first convolution)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers that passes the time embedding to ResBlocks and the context to transformers."""

    use_checkpoint = False

    def _run(self, x: Tensor, emb: Tensor, context: Tensor | None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None = None) -> Tensor:
        if self.use_checkpoint and torch.is_grad_enabled() and self.training:
            return checkpoint(self._run, x, emb, context, use_reentrant=False)
        return self._run(x, emb, context)


def _attention_block(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    heads, dim_head = cfg.heads_for(channels)
    return SpatialTransformer(channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim, cfg.dropout,
                              cfg.use_linear_in_transformer)


def build_time_embed(cfg: UNetConfig) -> nn.Sequential:
    dim = cfg.model_channels * 4
    return nn.Sequential(nn.Linear(cfg.model_channels, dim), nn.SiLU(), nn.Linear(dim, dim))


def build_encoder(cfg: UNetConfig, in_channels: int | None = None) -> tuple[nn.ModuleList, nn.Module, list[int]]:
    """Input blocks and middle block of the UNet; also used verbatim by ControlNet.

    Returns ``(input_blocks, middle_block, skip_channels)`` where ``skip_channels[i]`` is the width of the i-th input
    block's output (one skip connection / one ControlNet zero convolution each).
    """
    emb = cfg.model_channels * 4
    ch = cfg.model_channels
    blocks = [TimestepEmbedSequential(nn.Conv2d(in_channels or cfg.in_channels, ch, 3, padding=1))]
    skips = [ch]
    ds = 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [ResBlock(ch, emb, mult * cfg.model_channels, cfg.dropout)]
            ch = mult * cfg.model_channels
            if ds in cfg.attention_resolutions:
                layers.append(_attention_block(cfg, ch))
            blocks.append(TimestepEmbedSequential(*layers))
            skips.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch, cfg.conv_resample)))
            skips.append(ch)
            ds *= 2
    middle = TimestepEmbedSequential(ResBlock(ch, emb, ch, cfg.dropout), _attention_block(cfg, ch),
                                     ResBlock(ch, emb, ch, cfg.dropout))
    return nn.ModuleList(blocks), middle, skips


@dataclass
class EncoderFeatures:
    """What the decoder needs from the encoder: skip activations, middle output, time embedding."""

    skips: list[Tensor]
    middle: Tensor
    emb: Tensor


class UNetModel(nn.Module):
    """SD UNet. ``forward(x, t, context, control=None)`` predicts ε; ``control`` holds the ControlNet residuals
    ordered like ``ControlNet.forward`` returns them (one per input block, then the middle one)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.time_embed = build_time_embed(cfg)
        self.input_blocks, self.middle_block, skips = build_encoder(cfg)
        emb = cfg.model_channels * 4
        ch = skips[-1]
        output_blocks: list[nn.Module] = []
        ds = 2 ** (len(cfg.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), emb, cfg.model_channels * mult, cfg.dropout)]
                ch = cfg.model_channels * mult
                if ds in cfg.attention_resolutions:
                    layers.append(_attention_block(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, cfg.conv_resample))
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(output_blocks)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(cfg.model_channels, cfg.out_channels, 3, padding=1)))
        self.set_gradient_checkpointing(cfg.use_checkpoint)

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype: inputs are computed in it (DeepSpeed's bf16 mode holds the whole model in bf16)."""
        return self.out[-1].weight.dtype

    @property
    def num_control_residuals(self) -> int:
        """Number of control residuals the decoder consumes (13 at SD1.5): one per skip plus the middle one."""
        return len(self.input_blocks) + 1

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        self.gradient_checkpointing = enabled
        for module in self.modules():
            if isinstance(module, TimestepEmbedSequential):
                module.use_checkpoint = enabled

    def decoder_parameters(self) -> dict[str, nn.Parameter]:
        """The decoder's parameters (``output_blocks.*``, ``out.*``), the part ``sd_locked=False`` trains."""
        return {n: p for n, p in self.named_parameters() if n.startswith(("output_blocks.", "out."))}

    def encode(self, x: Tensor, timesteps: Tensor, context: Tensor | None, grad: bool = False) -> EncoderFeatures:
        """Time embedding, input blocks and middle block. Without autograd unless ``grad`` (ControlNet-style training
        never trains them; base pretraining does)."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
            skips = []
            h = x
            for block in self.input_blocks:
                h = block(h, emb, context)
                skips.append(h)
            return EncoderFeatures(skips, self.middle_block(h, emb, context), emb)

    def decode(self, features: EncoderFeatures, context: Tensor | None, control: Sequence[Tensor] | None = None,
               only_mid_control: bool = False) -> Tensor:
        """Decoder with control residuals added to the middle output and (unless ``only_mid_control``) every skip."""
        if control is not None and len(control) != self.num_control_residuals:
            raise ValueError(f"control has {len(control)} residuals, the UNet expects {self.num_control_residuals}")
        h = features.middle
        if control is not None:
            h = h + control[-1]
        for i, block in enumerate(self.output_blocks):
            skip_index = len(features.skips) - 1 - i
            skip = features.skips[skip_index]
            if control is not None and not only_mid_control:
                skip = skip + control[skip_index]
            h = block(torch.cat([h, skip], dim=1), features.emb, context)
        return self.out(h)

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor | None = None,
                control: Sequence[Tensor] | None = None, only_mid_control: bool = False,
                features: EncoderFeatures | None = None, encoder_grad: bool = False) -> Tensor:
        """Predict ε. ``features`` (from ``encode`` on the same x, t, context) skips the encoder pass;
        ``encoder_grad`` runs the encoder under autograd (to train it)."""
        if features is None:
            features = self.encode(x, timesteps, context, grad=encoder_grad)
        return self.decode(features, context, control, only_mid_control)
