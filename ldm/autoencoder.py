"""Stable Diffusion 1.5 first stage: the KL-regularised autoencoder (AutoencoderKL) in plain PyTorch.

Re-implements the architecture of the original latent-diffusion `ldm.models.autoencoder.AutoencoderKL` with the
`ldm.modules.diffusionmodules.model` Encoder/Decoder, so that SD1.5's `first_stage_model.*` weights load with
unchanged key names and shapes. Constructor arguments are the `ddconfig` names of cldm_v15.yaml (plus
`embed_dim` and `scale_factor`) so configs port 1:1. The training loss of the original (a discriminator, unused
in ControlNet work) is not included: in this project the first stage is always frozen (call `freeze()`).

Deliberate differences from the original:
- Attention uses `F.scaled_dot_product_attention` (single head over the H*W tokens, C channels), which is the
  same maths as the original bmm/softmax formulation.
- GroupNorm uses 32 groups whenever the channel count is divisible by 32 (always the case at SD1.5 geometry);
  otherwise the largest divisor of the channel count that is <= 32, so tiny CPU configs (e.g. ch=8) work.
- `IdentityFirstStage` offers the same interface for pixel-space tiny configs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ldm.attention import group_norm_groups

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["AutoencoderKL", "DiagonalGaussian", "IdentityFirstStage", "PointPosterior"]


def _norm(channels: int) -> nn.GroupNorm:
    # eps 1e-6 (not torch's default 1e-5) is what the SD1.5 VAE was trained with.
    return nn.GroupNorm(group_norm_groups(channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (norm -> SiLU -> conv, twice) without a time embedding."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The original names a 1x1 channel-changing skip `nin_shortcut` (conv_shortcut=False in every SD config).
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections named as in the original (q, k, v, proj_out)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose tokens are pixels; SDPA's default scale is 1/sqrt(C).
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(-1, -2) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)
        # contiguous(): the reshaped view is channels-last-strided (see ldm.attention.SpatialTransformer).
        out = out.transpose(-1, -2).reshape(b, c, height, width).contiguous()
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right/bottom only), exactly as the original VAE."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    """block_1 -> attn_1 -> block_2 at the lowest resolution (attributes named for state-dict compatibility)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (possibly empty) and an optional resampler.

    The resampler attribute is `downsample` (encoder) or `upsample` (decoder); the unused one stays None, which
    nn.Module keeps as a plain attribute, so it never shows up in the state dict.
    """

    def __init__(self, blocks: list[ResnetBlock], attns: list[AttnBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.downsample: Downsample | None = None
        self.upsample: Upsample | None = None

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:  # the original pairs attn[i] with block[i] when the level has attention
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
                 dropout: float, in_channels: int, resolution: int, z_channels: int, double_z: bool) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_mult[i], ch * mult
            blocks: list[ResnetBlock] = []
            attns: list[AttnBlock] = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(level)
        self.mid = _MidBlock(block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map before the output projection (down levels and middle block)."""
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if level.downsample is not None:
                h = level.downsample(h)
        return self.mid(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.trunk(x))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f)."""

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float, resolution: int, z_channels: int) -> None:
        super().__init__()
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, dropout)
        levels: list[_Level] = []
        # Built from the lowest resolution upwards, but stored so that up.{i} is level i (as the original's insert(0)).
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks: list[ResnetBlock] = []
            attns: list[AttnBlock] = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Diagonal Gaussian posterior from moments `parameters` = cat(mean, logvar) along channels (dim 1)."""

    def __init__(self, parameters: torch.Tensor) -> None:
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError(f"DiagonalGaussian: expected an even channel count in dim 1, got shape "
                             f"{tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Same clamp as ldm: keeps exp() finite for untrained or extreme encoders.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps; `generator` (if any) must live on the mean's device."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over all non-batch dimensions."""
        dims = tuple(range(1, self.mean.dim()))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


class PointPosterior:
    """Degenerate posterior of `IdentityFirstStage`: sample() and mode() return the input unchanged."""

    def __init__(self, value: torch.Tensor) -> None:
        self.mean = value

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return self.mean.new_zeros(self.mean.shape[0])


class AutoencoderKL(nn.Module):
    """SD1.5 VAE. `encode` image in [-1, 1] -> posterior; `decode` unscaled latent -> image in roughly [-1, 1].

    The diffusion model works on `scale_factor * latent` (0.18215 for SD1.5); use `encode_to_latent` /
    `decode_from_latent` for that convention.
    """

    def __init__(self, embed_dim: int, z_channels: int, resolution: int, in_channels: int, out_ch: int, ch: int,
                 ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int] = (),
                 dropout: float = 0.0, double_z: bool = True, scale_factor: float = 0.18215) -> None:
        super().__init__()
        if not double_z:
            # The KL autoencoder needs mean and logvar from the encoder; double_z=False belongs to VQ models.
            raise ValueError("AutoencoderKL: double_z must be True (the encoder must emit mean and logvar)")
        if len(ch_mult) == 0:
            raise ValueError("AutoencoderKL: ch_mult must have at least one entry")
        self.embed_dim = embed_dim
        self.in_channels = in_channels
        self.scale_factor = float(scale_factor)
        self._levels = len(ch_mult)
        attn_res = tuple(attn_resolutions)
        self.encoder = Encoder(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_res,
                               dropout=dropout, in_channels=in_channels, resolution=resolution,
                               z_channels=z_channels, double_z=double_z)
        self.decoder = Decoder(ch=ch, out_ch=out_ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               attn_resolutions=attn_res, dropout=dropout, resolution=resolution,
                               z_channels=z_channels)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (self._levels - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def freeze(self) -> AutoencoderKL:
        """Frozen, eval-mode first stage (as everywhere in this project); returns self for chaining."""
        self.requires_grad_(False)
        return self.eval()

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode: expected (B, {self.in_channels}, H, W) image, got shape "
                             f"{tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"AutoencoderKL.encode: height and width must be multiples of {f}, got "
                             f"{tuple(x.shape[-2:])}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"AutoencoderKL.decode: expected (B, {self.embed_dim}, h, w) latent, got shape "
                             f"{tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def encode_to_latent(self, x: torch.Tensor, generator: torch.Generator | None = None,
                         mode: bool = False) -> torch.Tensor:
        """Image in [-1, 1] -> scaled latent sample (``mode``: the posterior mean), the diffusion model's space."""
        posterior = self.encode(x)
        return self.scale_factor * (posterior.mode() if mode else posterior.sample(generator))

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> image (undoes `scale_factor` before decoding)."""
        return self.decode(z / self.scale_factor)

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction and posterior, as the original's forward."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """Pixel-space stand-in with the AutoencoderKL interface (no parameters, factor 1, scale 1)."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.scale_factor = 1.0

    @property
    def downsample_factor(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    def freeze(self) -> IdentityFirstStage:
        return self.eval()

    def _check(self, x: torch.Tensor, where: str) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"IdentityFirstStage.{where}: expected (B, {self.channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        return x

    def encode(self, x: torch.Tensor) -> PointPosterior:
        return PointPosterior(self._check(x, "encode"))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._check(z, "decode")

    def encode_to_latent(self, x: torch.Tensor, generator: torch.Generator | None = None,
                         mode: bool = False) -> torch.Tensor:
        return self._check(x, "encode_to_latent")

    def decode_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        return self._check(z, "decode_from_latent")

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, PointPosterior]:
        return x, self.encode(x)
