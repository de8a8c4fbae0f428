"""Hint encoders: map a 3-channel hint image to a residual at the latent resolution (×1/8).

* ``HintEncoder`` ("HI"): the eight 3×3 convolutions with SiLU of the original ControlNet (Zhang et al. 2023),
  channels 3→16→16→32(s2)→32→96(s2)→96→256(s2), then a zero-initialised 3×3 conv to the UNet width.
* ``DenseHintEncoder`` ("DHI", dense hint input): the Siamese-Diffusion encoder (Qiu et al., CVPR 2025): plain convs
  and residual blocks, with three Swin-style patch merges doing the downsampling, then the same zero conv.

Both store their layers under ``input_hint_block.*`` exactly as the original checkpoints do (HI as a flat Sequential,
DHI as ``input_hint_block.0.<name>`` followed by the zero conv ``input_hint_block.1``), so released weights load as-is.
The encoder is chosen by name through ``HINT_ENCODERS`` (config key ``control.hint_encoder: hi | dhi``).
"""

from __future__ import annotations

from collections.abc import Callable

from ldm.attention import zero_module

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cldm.settings import HINT_DOWNSAMPLE  # noqa: F401  (re-exported)


class HintEncoder(nn.Sequential):
    """The original ControlNet hint encoder (HI)."""

    def __init__(self, hint_channels: int, model_channels: int):
        widths = [(hint_channels, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1),
                  (96, 256, 2)]
        layers: list[nn.Module] = []
        for cin, cout, stride in widths:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU()]
        layers.append(zero_module(nn.Conv2d(256, model_channels, 3, padding=1)))
        super().__init__(*layers)


class ResidualUnit(nn.Module):
    """``Res(C)(x) = SiLU(conv2(SiLU(conv1(x))) + x)`` with 3×3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.conv2(F.silu(self.conv1(x))) + x)


class PatchMerge(nn.Module):
    """Swin patch merging: 2×2 space-to-depth (offsets (0,0),(1,0),(0,1),(1,1) as (row, col)), LayerNorm, 4C→2C."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * channels)
        self.reduction = nn.Linear(4 * channels, 2 * channels)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 2 or x.shape[-1] % 2:
            raise ValueError(f"PatchMerge needs even height and width, got {tuple(x.shape[-2:])}")
        x = x.permute(0, 2, 3, 1)  # channels-last
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        # Channels-first shape over channels-last memory: the DHI trunk runs its convolutions in that layout
        # (DenseHintEncoder.forward), so this is a view, not a copy.
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


class _DenseTrunk(nn.Module):
    """The DHI body up to 256 channels at 1/8 resolution (stored as ``input_hint_block.0``)."""

    def __init__(self, hint_channels: int):
        super().__init__()
        self.initial_conv = nn.Conv2d(hint_channels, 16, 3, padding=1)
        self.layer1 = ResidualUnit(16)
        self.conv_before_res2 = nn.Conv2d(16, 32, 3, padding=1)
        self.layer2 = ResidualUnit(32)
        self.patch_merge1 = PatchMerge(32)
        self.conv_before_res3 = nn.Conv2d(64, 64, 3, padding=1)
        self.layer3 = ResidualUnit(64)
        self.patch_merge2 = PatchMerge(64)
        self.conv_before_res4 = nn.Conv2d(128, 128, 3, padding=1)
        self.layer4 = ResidualUnit(128)
        self.patch_merge3 = PatchMerge(128)
        self.conv_before_res5 = nn.Conv2d(256, 256, 3, padding=1)
        self.layer5 = ResidualUnit(256)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer1(self.initial_conv(x))
        x = self.layer2(self.conv_before_res2(x))
        x = self.layer3(self.conv_before_res3(self.patch_merge1(x)))
        x = self.layer4(self.conv_before_res4(self.patch_merge2(x)))
        return self.layer5(self.conv_before_res5(self.patch_merge3(x)))


class DenseHintEncoder(nn.Sequential):
    """The Siamese-Diffusion dense hint encoder (DHI): trunk, then a zero-initialised conv to the UNet width."""

    def __init__(self, hint_channels: int, model_channels: int):
        super().__init__(_DenseTrunk(hint_channels), zero_module(nn.Conv2d(256, model_channels, 3, padding=1)))

    def forward(self, x: Tensor) -> Tensor:
        # The trunk has no GroupNorm (only convs, SiLU and the patch merges' channels-last LayerNorm), so it runs in
        # channels-last memory, where the convolutions are faster (oneDNN on CPU: 1.25x for the trunk at 64 px,
        # bench/hint_layout.py). The output returns to channels-first memory: the ControlNet's GroupNorms need it
        # (torch's CPU GroupNorm backward crashes on channels-last inputs).
        return self[1](self[0](x.contiguous(memory_format=torch.channels_last))).contiguous()


HINT_ENCODERS: dict[str, Callable[[int, int], nn.Module]] = {"hi": HintEncoder, "dhi": DenseHintEncoder}


def build_hint_encoder(name: str, hint_channels: int, model_channels: int) -> nn.Module:
    if name not in HINT_ENCODERS:
        raise ValueError(f"control.hint_encoder: unknown encoder {name!r}; expected one of {sorted(HINT_ENCODERS)}")
    return HINT_ENCODERS[name](hint_channels, model_channels)
