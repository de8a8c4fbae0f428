"""The experiment schema: frozen dataclasses, one per YAML section, that the code is built from.

The sections are the same dataclasses the networks take (``UNetConfig``, ``ControlConfig``, ``TextEncoderConfig``,
``LossWeights``), so YAML keys *are* constructor arguments: ``unet`` / ``control`` / ``first_stage`` keep the
parameter names of the original ``cldm_v15.yaml``, and the ControlNet geometry is derived from the ``unet`` section.
Loading and cross-section checks are in ``siamese.config.loading``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ldm.settings import TextEncoderConfig, UNetConfig

from cldm.settings import HINT_DOWNSAMPLE, ControlConfig, LoraSettings
from siamese.config.maskgen import MaskGenConfig
from siamese.losses import LossWeights
from siamese.schedules import SiameseRecipe


@dataclass(frozen=True)
class DDConfig:
    """``first_stage_config.params.ddconfig`` of cldm_v15.yaml (defaults: SD1.5)."""

    double_z: bool = True
    z_channels: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0


@dataclass(frozen=True)
class FirstStageConfig:
    kind: str = "autoencoder_kl"  # autoencoder_kl | identity (pixel space)
    embed_dim: int = 4
    scale_factor: float = 0.18215
    ddconfig: DDConfig = field(default_factory=DDConfig)

    @property
    def downsample(self) -> int:
        return 1 if self.kind == "identity" else 2 ** (len(self.ddconfig.ch_mult) - 1)


@dataclass(frozen=True)
class ScheduleConfig:
    beta_schedule: str = "scaled_linear"
    timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    first_stage: FirstStageConfig = field(default_factory=FirstStageConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass(frozen=True)
class MethodConfig:
    """The training objective. ``siamese`` with weights (1, 0, 0, 0) is plain ControlNet training."""

    name: str = "siamese"  # siamese | controlnet (= mask-only baseline; the extra weights must be 0)
    sd_locked: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    mask_control_weight: float = 1.0
    image_control_weight: float = 1.0
    image_ramp: str = "linear"
    aug_start: float = 1.0 / 3.0
    aug_t_max: int = 200
    aug_noise: str = "same"
    prompt_dropout: float = 0.05
    # LoRA adapters (peft) instead of full decoder fine-tuning; needs sd_locked: false (cldm/lora.py).
    lora: LoraSettings = field(default_factory=LoraSettings)

    def recipe(self, total_steps: int) -> SiameseRecipe:
        return SiameseRecipe(total_steps=total_steps, mask_control_weight=self.mask_control_weight,
                             image_control_weight=self.image_control_weight, image_ramp=self.image_ramp,
                             aug_start=self.aug_start, aug_t_max=self.aug_t_max, aug_noise=self.aug_noise)


@dataclass(frozen=True)
class DataConfig:
    root: str | None = None  # folder with prompt.json (or the JSONL file); null → built-in generated pairs
    resolution: int = 384
    prompt: str | None = None  # overrides every prompt when set; the generated data's prompt otherwise
    synthetic_samples: int = 64
    num_workers: int = 2
    # Masks: foreground = gray > mask_threshold (0..254). null → automatic: a mask whose values are all in {0, 1} is
    # a label mask (foreground = 1), any other mask uses 127 (the released code's threshold).
    mask_threshold: int | None = None
    # Images: how 16-bit and float intensities become 8 bit (siamese.data.images): auto (12-bit data in 16-bit
    # files ×255/4095, other 16-bit ÷257), full_range, minmax, or percentile[:LOW,HIGH] (per image, default 0.5,99.5).
    intensity: str = "auto"


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass(frozen=True)
class TrainConfig:
    init_ckpt: str | None = None  # the checkpoint made by tool_add_control.py; null → random init (tests/demo)
    output_dir: str = "runs/siamese"
    seed: int = 42
    lr: float = 1.0e-5
    batch_size: int = 6
    total_steps: int = 3000  # S of the method's ramp and gates, and the run length
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: int = -1  # -1: all visible devices
    num_nodes: int = 1
    strategy: str = "deepspeed_stage_2"  # deepspeed_stage_2 | ddp | auto
    precision: str = "32"  # 32 | bf16-mixed | 16-mixed (GPU)
    gradient_checkpointing: bool = True
    checkpoint_every: int = 500
    keep_checkpoints: int = 3  # -1 keeps all
    log_every: int = 10
    image_log_every: int = 0  # 0 disables the image-logging callback
    ema: EMAConfig = field(default_factory=EMAConfig)
    logger: str = "csv"  # csv | tensorboard | both
    val_every: int = 0  # validation: every N steps sample fixed held-out masks (0: off)
    val_masks: str | None = None  # folder of masks or prompt.json; null: generated held-out masks (data.root null)
    val_samples: int = 8
    val_segmenter: str | None = None  # segmenter for mask fidelity (tools.evaluate's); null: the colour rule on
    #                                   generated data, else the grid only


MASK_MODES = ("real", "random")  # sampling conditions on each mask as given, or on a randomly augmented copy
PRECISIONS = ("fp32", "bf16", "fp16")  # sampling precisions (``siamese.sampling.autocast_context``)


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 9.0
    # null: the training data's prompt (the most common one), resolved when training starts and saved in the run's
    # config and every checkpoint it exports; a string here wins (siamese.config.with_data_prompt).
    prompt: str | None = None
    sampler: str = "ddim"  # ddim | dpmpp_2m | unipc (ldm.solvers; the solvers need eta 0)
    cfg_mask: float | None = None  # separate guidance of the mask (InstructPix2Pix eq. 3); null: text guidance only


@dataclass(frozen=True)
class AutoencoderPretrain:
    """First-stage pretraining (``python -m tools.pretrain``): L1 reconstruction + KL, optional perceptual term.

    Defaults are the SD1.5 VAE's (Rombach et al. 2022, ``kl_weight`` 1e-6 on the pixel-summed L1); the adversarial
    term of the original is left out. ``calibrate_samples`` images set ``scale_factor = 1 / std(latents)`` (how
    0.18215 was obtained for SD); 0 keeps the configured value.
    """

    total_steps: int = 10000
    lr: float = 4.5e-6
    batch_size: int = 8
    kl_weight: float = 1.0e-6
    perceptual_weight: float = 0.0
    perceptual_weights: str | None = None  # local torchvision VGG16 weights (.safetensors/.pth); nothing downloads
    calibrate_samples: int = 512


@dataclass(frozen=True)
class UNetPretrain:
    """Text-conditioned UNet pretraining on the frozen first stage: ε-prediction, the whole UNet trained."""

    total_steps: int = 10000
    lr: float = 1.0e-4
    batch_size: int = 8
    prompt_dropout: float = 0.1  # SD1.5 drops 10 % of the captions so classifier-free guidance works
    loss_region: str = "all"  # lesion | background: MedDiff-FT's masked loss (needs masks: data with prompt.json)


@dataclass(frozen=True)
class PretrainConfig:
    """The two stages of a base model; every other setting (devices, strategy, checkpoints) is the ``train``
    section's, which each stage inherits with its own steps, lr and batch size."""

    autoencoder: AutoencoderPretrain = field(default_factory=AutoencoderPretrain)
    unet: UNetPretrain = field(default_factory=UNetPretrain)


PRETRAIN_STAGES = ("autoencoder", "unet")
LOSS_REGIONS = ("all", "lesion", "background")  # cldm.pretrain.LatentDiffusionModule's loss_region


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    maskgen: MaskGenConfig = field(default_factory=MaskGenConfig)  # python -m tools.maskgen

    @property
    def latent_size(self) -> int:
        return self.data.resolution // self.model.first_stage.downsample

    @property
    def hint_size(self) -> int:
        """Hints are read at HINT_DOWNSAMPLE × the latent size (= the image size with an ×8 VAE)."""
        return self.latent_size * HINT_DOWNSAMPLE
