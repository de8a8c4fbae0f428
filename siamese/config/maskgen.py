"""The ``maskgen`` section of the experiment config: MedDiff-FT's mask generator (Xie et al., MICCAI 2025).

MedDiff-FT trains a small pixel-space DDPM on the dataset's binary masks and samples new masks for the image-mask
pair sampler. Defaults are the paper's size (a 4-level UNet, widths 64/128/256/512, 256² masks) and the original DDPM
schedule (Ho et al. 2020: linear β from 1e-4 to 2e-2 over T = 1000). The schema knows every section, so this one
lives with it although ``siamese.meddiff.maskgen`` is its only user; ``problems`` lists what ``check`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm.settings import BETA_KINDS

PREDICTIONS = ("v", "eps")  # what the mask network predicts (siamese.meddiff.maskgen.training_target)


@dataclass(frozen=True)
class MaskUNetSettings:
    """The ``ldm.unet.UNetModel`` fields a mask denoiser sets (1 channel in and out, no attention in the levels).

    ``UNetModel`` always has a spatial transformer in its middle block, and its cross-attention needs a context of
    width ``context_dim`` (``context=None`` does not fit): the denoiser passes one all-zero token, so that layer is a
    constant and the network is unconditional.
    """

    model_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    num_heads: int = 8
    context_dim: int = 8
    dropout: float = 0.0
    use_checkpoint: bool = False


@dataclass(frozen=True)
class MaskGenConfig:
    """Training and sampling of the mask DDPM (``python -m tools.maskgen``); the rest of ``train`` (devices,
    strategy, checkpoints) is inherited, with the run in ``<train.output_dir>/maskgen``."""

    unet: MaskUNetSettings = field(default_factory=MaskUNetSettings)
    resolution: int = 256
    total_steps: int = 20000
    lr: float = 1.0e-4
    batch_size: int = 16
    sample_steps: int = 50  # DDIM steps (sample.sampler chooses the solver)
    threshold: float = 0.5  # foreground where (x + 1) / 2 > threshold
    prediction: str = "v"  # v (Salimans & Ho 2022) or eps (DDPM's); see siamese.meddiff.maskgen
    beta_schedule: str = "linear"
    timesteps: int = 1000
    linear_start: float = 1.0e-4
    linear_end: float = 2.0e-2

    def problems(self) -> list[str]:
        out = []
        factor = 2 ** (len(self.unet.channel_mult) - 1)
        if self.resolution <= 0 or self.resolution % factor:
            out.append(f"maskgen.resolution {self.resolution} must be a positive multiple of {factor} (the mask "
                       "UNet's downsampling)")
        for key in ("total_steps", "batch_size", "sample_steps", "timesteps"):
            if getattr(self, key) <= 0:
                out.append(f"maskgen.{key} must be > 0, got {getattr(self, key)}")
        if self.prediction not in PREDICTIONS:
            out.append(f"maskgen.prediction {self.prediction!r} is not one of {list(PREDICTIONS)}")
        if self.beta_schedule not in BETA_KINDS:
            out.append(f"maskgen.beta_schedule {self.beta_schedule!r} is not one of {list(BETA_KINDS)}")
        if self.lr <= 0:
            out.append(f"maskgen.lr must be > 0, got {self.lr}")
        if not 0.0 < self.threshold < 1.0:
            out.append(f"maskgen.threshold must be in (0, 1), got {self.threshold}")
        u = self.unet
        if u.model_channels <= 0 or u.num_res_blocks <= 0 or not u.channel_mult or u.context_dim <= 0:
            out.append("maskgen.unet: model_channels, num_res_blocks, context_dim must be > 0, channel_mult non-empty")
        elif (u.model_channels * u.channel_mult[-1]) % u.num_heads:
            out.append(f"maskgen.unet.num_heads {u.num_heads} must divide the middle width "
                       f"{u.model_channels * u.channel_mult[-1]}")
        return out
