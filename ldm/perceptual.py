"""A perceptual distance for first-stage training: LPIPS-style on VGG16 features, from a local weight file only.

Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"), eq. 1:
``d(x, x0) = Σ_l 1/(H_l W_l) Σ_{h,w} ‖w_l ⊙ (ŷ^l_hw − ŷ0^l_hw)‖²``, with ``ŷ^l`` the channel-normalised activations
of VGG16 at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 and the inputs scaled as LPIPS does. The learned
per-channel weights ``w_l`` of the released LPIPS are not shipped with any package here, so ``w_l = 1`` (the
paper's "baseline" variant of the distance). The SD1.5 VAE was trained with L1 + LPIPS; this is the optional
perceptual term of ``tools.pretrain``.

The VGG16 weights come from a file the user passes (torchvision's ``vgg16`` state dict, with or without the
``features.`` prefix; classifier weights are ignored), read with ``weights_only`` loading or safetensors: nothing is
downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ldm.checkpoint import load_state_dict

import torch
from torch import Tensor, nn

# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features.
VGG16_TAPS = (3, 8, 15, 22, 29)
# LPIPS's input scaling layer: (x - shift) / scale for images in [-1, 1].
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 convolutional trunk (random weights), up to relu5_3."""
    from torchvision.models import vgg16  # imported here: only the perceptual term needs torchvision

    return vgg16(weights=None).features[: VGG16_TAPS[-1] + 1]


class PerceptualDistance(nn.Module):
    """``forward(x, y)`` → per-sample distance (B,) between images in [-1, 1]; frozen, eval mode."""

    def __init__(self, features: nn.Sequential):
        super().__init__()
        self.features = features.requires_grad_(False).eval()
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path) -> PerceptualDistance:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"perceptual weights not found: {path} (expected torchvision's VGG16 state dict "
                                    f"as .safetensors/.pth; nothing is downloaded)")
        features = vgg16_features()
        state = load_state_dict(path)
        state = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()
                 if not k.startswith("classifier.")}
        state = {k: v for k, v in state.items() if int(k.split(".", 1)[0]) < len(features)}
        expected = features.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing or any(state[k].shape != expected[k].shape for k in expected):
            raise ValueError(f"{path}: not torchvision's VGG16 weights (missing {missing[:3]} or other shapes)")
        features.load_state_dict(state)
        return cls(features)

    def train(self, mode: bool = True) -> PerceptualDistance:
        return super().train(False)  # frozen: always eval

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = x.new_zeros(x.shape[0], dtype=torch.float32)
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in VGG16_TAPS:
                a, b = h.chunk(2)
                a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                total = total + (a - b).pow(2).sum(1).mean((1, 2))
        return total
