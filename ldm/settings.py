"""Settings of the SD1.5 parts that configs and command-line parsers need, with no torch import.

The network geometry dataclasses (``UNetConfig``, ``TextEncoderConfig``), the names a config may use
(``BETA_KINDS``, ``SAMPLERS``) and the latent-region choice (``parse_region``) live here so that loading a config,
checking it and printing ``--help`` never pay for importing torch; ``ldm.unet``, ``ldm.text_encoder``,
``ldm.schedule``, ``ldm.solvers`` and ``ldm.regions`` re-export them.
Imports only the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BOS_TOKEN_ID = 49406  # "<start_of_text>" in OpenAI's CLIP vocabulary
EOS_TOKEN_ID = 49407  # "<end_of_text>"; SD1.5 also pads with it

BETA_KINDS: tuple[str, ...] = ("scaled_linear", "linear")
"""Noise schedules ``ldm.schedule.make_betas`` knows."""

# The latent region background-preserving sampling generates (``ldm.regions``, whose docstring defines the modes).
REGION_MODES: tuple[str, ...] = ("max-pool", "area", "dilate")
DEFAULT_REGION = "max-pool"
REGION_HELP = ("max-pool: a latent cell is generated when any of its pixels is in the mask (default; up to "
               "factor − 1 pixels beyond it); area:F: when the mask covers a share ≥ F of its pixels (0 < F ≤ 1; "
               "area:0.5 rounds the mask to the nearest cells); dilate:N: the mask dilated by N pixels (a disk), "
               "then area:0.5")


@dataclass(frozen=True)
class RegionSpec:
    """A parsed latent-region choice: ``mode`` in ``REGION_MODES``, ``fraction`` (area), ``pixels`` (dilate)."""

    mode: str
    fraction: float | None = None
    pixels: int | None = None

    def __str__(self) -> str:
        if self.mode == "area":
            return f"area:{self.fraction!r}"
        if self.mode == "dilate":
            return f"dilate:{self.pixels}"
        return self.mode


def parse_region(spec: str | RegionSpec) -> RegionSpec:
    """``"max-pool"``, ``"area:F"`` (0 < F ≤ 1) or ``"dilate:N"`` (integer N ≥ 0) → ``RegionSpec``; its ``str`` is
    the canonical form (``"area:.5"`` → ``"area:0.5"``, ``"dilate:03"`` → ``"dilate:3"``). Anything else: one-line
    ValueError naming the value."""
    if isinstance(spec, RegionSpec):
        return spec
    text = str(spec).strip()
    mode, sep, value = text.partition(":")
    expected = "expected max-pool, area:F (0 < F <= 1) or dilate:N (integer N >= 0)"
    if mode == "max-pool" and not sep:
        return RegionSpec("max-pool")
    if mode == "area" and sep:
        try:
            fraction = float(value)
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction <= 1.0:  # nan fails too
            raise ValueError(f"region {spec!r}: the area share must be a number in (0, 1]; {expected}")
        return RegionSpec("area", fraction=fraction)
    if mode == "dilate" and sep:
        if not (value.strip().isascii() and value.strip().isdigit()):
            raise ValueError(f"region {spec!r}: the dilation must be an integer number of pixels >= 0; {expected}")
        return RegionSpec("dilate", pixels=int(value))
    raise ValueError(f"region {spec!r}: {expected}")


SAMPLERS: tuple[str, ...] = ("ddim", "dpmpp_2m", "unipc")
"""Names accepted by ``ldm.solvers.sample``: DDIM (``ldm.sampler.ddim_sample``), DPM-Solver++(2M) and UniPC."""


@dataclass(frozen=True)
class UNetConfig:
    """UNet hyper-parameters under their ``cldm_v15.yaml`` names (defaults: SD1.5)."""

    image_size: int = 32  # informational only (latent size the original was configured with)
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    num_res_blocks: int = 2
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_heads: int = 8
    num_head_channels: int = -1
    use_spatial_transformer: bool = True
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    legacy: bool = False
    use_checkpoint: bool = False
    dropout: float = 0.0
    conv_resample: bool = True

    def __post_init__(self) -> None:
        if self.model_channels <= 0 or self.num_res_blocks <= 0 or not self.channel_mult:
            raise ValueError("unet: model_channels and num_res_blocks must be > 0 and channel_mult non-empty")
        if not self.use_spatial_transformer:
            raise ValueError("unet.use_spatial_transformer=false is not supported (SD1.5 uses the spatial transformer)")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("unet: set num_heads or num_head_channels (both are -1)")

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) at a given width, with the original's num_heads / num_head_channels / legacy rules."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads
        return heads, dim_head


@dataclass(frozen=True)
class TextEncoderConfig:
    """Geometry of the CLIP text transformer. Defaults are SD1.5's (OpenAI CLIP ViT-L/14 text model)."""

    vocab_size: int = 49408
    width: int = 768
    layers: int = 12
    heads: int = 12
    context_length: int = 77
    quick_gelu: bool = True

    def __post_init__(self) -> None:
        if self.width % self.heads != 0:
            raise ValueError(f"TextEncoderConfig: width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 2:
            raise ValueError(f"TextEncoderConfig: context_length {self.context_length} < 2 leaves no room for BOS/EOS")
        if self.vocab_size <= EOS_TOKEN_ID:
            raise ValueError(
                f"TextEncoderConfig: vocab_size {self.vocab_size} must exceed {EOS_TOKEN_ID} for the CLIP BPE tokenizer"
            )

    @classmethod
    def tiny(cls) -> TextEncoderConfig:
        """CPU-sized preset for tests; keeps the full vocabulary so the real tokenizer's ids stay valid."""
        return cls(vocab_size=49408, width=32, layers=2, heads=2, context_length=77, quick_gelu=True)
