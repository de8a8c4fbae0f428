"""Settings of the ControlNet parts that configs and command-line parsers need, with no torch import.

``ControlConfig`` (what ControlNet adds to the UNet geometry), ``HINT_DOWNSAMPLE`` (hint pixels per latent pixel)
and ``LoraSettings`` (``method.lora``) live here so that loading a config and printing ``--help`` never import
torch; ``cldm.controlnet``, ``cldm.hint`` and ``cldm.lora`` re-export them. Imports only the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

HINT_DOWNSAMPLE = 8
"""The hint encoders map a hint of H×W pixels to the latent's H/8 × W/8."""

# Where an SD1.x checkpoint keeps its networks (``cldm.convert``).
CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."
FIRST_STAGE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

DIFFUSERS_CONFIG_NAME = "config.json"  # what diffusers' ControlNetModel.from_pretrained(folder) reads
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class ControlConfig:
    """What ControlNet adds to the UNet geometry (defaults: the Siamese-Diffusion release)."""

    hint_channels: int = 3
    hint_encoder: str = "dhi"
    only_mid_control: bool = False
    control_scale: float = 1.0  # the original's ``control_scales = [1.0] * 13``, one scalar here


# Module-name suffixes LoRA may wrap in a UNet block (nn.Linear / nn.Conv2d leaves of the SD layout).
KNOWN_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0",  # self- and cross-attention projections
    "ff.net.0.proj", "ff.net.2",  # GEGLU feed-forward
    "proj_in", "proj_out",  # spatial-transformer input/output projections
    "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection",  # ResBlock convolutions / time projection
)


@dataclass(frozen=True)
class LoraSettings:
    """``method.lora`` of the config. ``targets`` are module-name suffixes (see ``KNOWN_TARGETS``)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in",
                                "proj_out")
    control: bool = False  # adapters on the ControlNet encoder copy too (else the ControlNet trains in full)
    dropout: float = 0.0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def problems(self) -> list[str]:
        """What is wrong with these settings, one sentence each (empty when valid)."""
        out = []
        if self.rank < 1:
            out.append(f"method.lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            out.append(f"method.lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"method.lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            out.append("method.lora.targets is empty")
        unknown = [t for t in self.targets if t not in KNOWN_TARGETS]
        if unknown:
            out.append(f"method.lora.targets {unknown} are not among {list(KNOWN_TARGETS)}")
        return out
