"""Experiment configuration: one typed schema for the YAML files in ``configs/``, validated before anything is built.

The schema is made of the same frozen dataclasses the code is built from (``UNetConfig``, ``ControlConfig``,
``TextEncoderConfig``, ``LossWeights``), so YAML keys *are* constructor arguments: the ``unet`` / ``control`` /
``first_stage`` sections keep the parameter names of the original ``cldm_v15.yaml``, and the ControlNet geometry is
derived from the ``unet`` section. OmegaConf merges a YAML file and ``key=value`` overrides onto the schema, so
unknown keys and wrong types fail with the offending key named, before any weights load. ``check`` then validates
relations between sections. ``siamese.factory`` is the one place where this becomes objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from ldm.checkpoint import SAFETENSORS_SUFFIXES, read_metadata
from ldm.schedule import BETA_KINDS
from ldm.solvers import SAMPLERS
from ldm.text_encoder import TextEncoderConfig
from ldm.unet import UNetConfig

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cldm.controlnet import ControlConfig
from cldm.hint import HINT_DOWNSAMPLE
from cldm.lora import LoraSettings
from siamese.losses import LossWeights
from siamese.maskgen_config import MaskGenConfig
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


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 50
    eta: float = 0.0
    cfg_scale: float = 9.0
    prompt: str = "A photo of a polyp."
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


class ConfigError(ValueError):
    """A configuration problem, described in one line."""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                text: str | None = None, where: str | None = None) -> ExperimentConfig:
    """Schema defaults ← YAML file (or YAML ``text``) ← ``key=value`` overrides, validated.

    Raises ``ConfigError`` naming the culprit; ``where`` names the source in messages (default: the path).
    """
    schema = OmegaConf.structured(ExperimentConfig)
    where = where or (str(path) if path is not None else "<defaults>")
    try:
        layers = [schema]
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            layers.append(OmegaConf.load(path))
        if text is not None:
            layers.append(OmegaConf.create(text))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{where}: {reason}" + (f" (key: {key})" if key else "")) from None
    except (ValueError, TypeError) as exc:  # __post_init__ validation of a section
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from None
    check(cfg, where)
    return cfg


def check(cfg: ExperimentConfig, where: str = "config") -> None:
    """Relations between sections that no single dataclass can check."""
    m, fs = cfg.model, cfg.model.first_stage

    def fail(msg: str) -> None:
        raise ConfigError(f"{where}: {msg}")

    if fs.kind not in ("autoencoder_kl", "identity"):
        fail(f"model.first_stage.kind {fs.kind!r} is not one of ['autoencoder_kl', 'identity']")
    latent_channels = fs.ddconfig.in_channels if fs.kind == "identity" else fs.embed_dim
    if m.unet.in_channels != latent_channels or m.unet.out_channels != latent_channels:
        fail(f"model.unet in/out_channels ({m.unet.in_channels}/{m.unet.out_channels}) must equal the first stage's "
             f"latent channels ({latent_channels})")
    if m.text_encoder.width != m.unet.context_dim:
        fail(f"model.text_encoder.width {m.text_encoder.width} must equal model.unet.context_dim {m.unet.context_dim}")
    if m.schedule.beta_schedule not in BETA_KINDS:
        fail(f"model.schedule.beta_schedule {m.schedule.beta_schedule!r} is not one of {list(BETA_KINDS)}")
    unet_factor = 2 ** (len(m.unet.channel_mult) - 1)
    if cfg.data.resolution % (fs.downsample * unet_factor):
        fail(f"data.resolution {cfg.data.resolution} must be a multiple of {fs.downsample * unet_factor} "
             f"(first-stage factor {fs.downsample} × UNet downsampling {unet_factor})")
    if cfg.method.name not in ("siamese", "controlnet"):
        fail(f"method.name {cfg.method.name!r} is not one of ['siamese', 'controlnet']")
    w = cfg.method.weights
    if cfg.method.name == "controlnet" and (w.image or w.consistency or w.aug):
        fail("method.name=controlnet trains the mask branch only: set method.weights.image/consistency/aug to 0")
    lora = cfg.method.lora
    if lora.enabled:
        for problem in lora.problems():
            fail(problem)
        if cfg.method.sd_locked:
            fail("method.lora.enabled adapts the UNet decoder: set method.sd_locked: false (LoRA replaces its full "
                 "decoder fine-tuning)")
    if not 0.0 <= cfg.method.prompt_dropout <= 1.0:
        fail(f"method.prompt_dropout must be in [0, 1], got {cfg.method.prompt_dropout}")
    if cfg.train.precision not in ("32", "bf16-mixed", "16-mixed", "bf16-true"):
        fail(f"train.precision {cfg.train.precision!r} is not one of ['32', 'bf16-mixed', '16-mixed', 'bf16-true']")
    for key in ("batch_size", "total_steps", "checkpoint_every", "log_every"):
        if getattr(cfg.train, key) <= 0:
            fail(f"train.{key} must be > 0, got {getattr(cfg.train, key)}")
    if cfg.train.lr <= 0:
        fail(f"train.lr must be > 0, got {cfg.train.lr}")
    if cfg.train.logger not in ("csv", "tensorboard", "both"):
        fail(f"train.logger {cfg.train.logger!r} is not one of ['csv', 'tensorboard', 'both']")
    if cfg.train.val_every < 0 or cfg.train.val_samples <= 0:
        fail(f"train.val_every must be >= 0 and train.val_samples > 0, got {cfg.train.val_every}, "
             f"{cfg.train.val_samples}")
    try:
        cfg.method.recipe(cfg.train.total_steps)  # validates ramp / noise / aug_start choices
    except ValueError as exc:
        fail(f"method: {exc}")
    threshold = cfg.data.mask_threshold
    if threshold is not None and (isinstance(threshold, bool) or not 0 <= threshold <= 254):
        fail(f"data.mask_threshold must be an 8-bit gray level in 0..254 or null (automatic: 0/1 label masks → "
             f"foreground = 1, others → 127), got {threshold}")
    if cfg.data.root is None and cfg.data.synthetic_samples <= 0:
        fail("data.synthetic_samples must be > 0 when data.root is null (generated data)")
    for name in PRETRAIN_STAGES:
        stage = getattr(cfg.pretrain, name)
        for key in ("total_steps", "batch_size"):
            if getattr(stage, key) <= 0:
                fail(f"pretrain.{name}.{key} must be > 0, got {getattr(stage, key)}")
        if stage.lr <= 0:
            fail(f"pretrain.{name}.lr must be > 0, got {stage.lr}")
    ae = cfg.pretrain.autoencoder
    if ae.kl_weight < 0 or ae.perceptual_weight < 0 or ae.calibrate_samples < 0:
        fail("pretrain.autoencoder.kl_weight, perceptual_weight and calibrate_samples must be >= 0")
    if ae.perceptual_weight > 0 and not ae.perceptual_weights:
        fail("pretrain.autoencoder.perceptual_weight > 0 needs pretrain.autoencoder.perceptual_weights (a local "
             "VGG16 weight file; nothing is downloaded)")
    if cfg.pretrain.unet.loss_region not in LOSS_REGIONS:
        fail(f"pretrain.unet.loss_region {cfg.pretrain.unet.loss_region!r} is not one of {list(LOSS_REGIONS)}")
    if not 0.0 <= cfg.pretrain.unet.prompt_dropout <= 1.0:
        fail(f"pretrain.unet.prompt_dropout must be in [0, 1], got {cfg.pretrain.unet.prompt_dropout}")
    if cfg.sample.sampler not in SAMPLERS:
        fail(f"sample.sampler {cfg.sample.sampler!r} is not one of {list(SAMPLERS)}")
    if cfg.sample.cfg_mask is not None and cfg.sample.cfg_mask < 0:
        fail(f"sample.cfg_mask must be >= 0 or null, got {cfg.sample.cfg_mask}")
    for problem in cfg.maskgen.problems():
        fail(problem)


def stage_config(cfg: ExperimentConfig, stage: str) -> ExperimentConfig:
    """The config a pretraining stage trains with: ``train`` with the stage's steps, lr and batch size, and its own
    run directory ``<train.output_dir>/<stage>`` (so checkpoints, logs and ``--resume latest`` are per stage)."""
    if stage not in PRETRAIN_STAGES:
        raise ConfigError(f"unknown pretraining stage {stage!r}; expected one of {list(PRETRAIN_STAGES)}")
    s = getattr(cfg.pretrain, stage)
    train = replace(cfg.train, total_steps=s.total_steps, lr=s.lr, batch_size=s.batch_size,
                    output_dir=str(Path(cfg.train.output_dir) / stage))
    return replace(cfg, train=train)


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: ExperimentConfig) -> str:
    """Short stable hash of the resolved configuration (for manifests and run names)."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


# Checkpoints written by the tools carry the resolved config under this safetensors metadata key, so a merged
# checkpoint is self-describing (tutorial_inference.py can run without --config).
METADATA_CONFIG = "siamese.config"
METADATA_CONFIG_HASH = "siamese.config_hash"
METADATA_KIND = "siamese.kind"


def checkpoint_metadata(cfg: ExperimentConfig | None, kind: str, **extra: str) -> dict[str, str]:
    """String metadata for a checkpoint: its kind (init / fp32 / merged / trainable), the config, extras."""
    meta = {METADATA_KIND: kind, **extra}
    if cfg is not None:
        meta[METADATA_CONFIG] = to_yaml(cfg)
        meta[METADATA_CONFIG_HASH] = config_hash(cfg)
    return meta


def config_from_metadata(meta: dict[str, str], where: str) -> ExperimentConfig | None:
    """The config a checkpoint carries in its metadata (validated), or None when it carries none."""
    text = meta.get(METADATA_CONFIG)
    if not text:
        return None
    return load_config(None, text=text, where=f"{where} (metadata {METADATA_CONFIG})")


def check_same_latents(cfg: ExperimentConfig, path: str | Path, where: str) -> None:
    """A safetensors checkpoint this framework wrote carries its config: its latent scale factor must be the config's.

    A pretrained base calibrates ``model.first_stage.scale_factor`` to its own VAE; training or converting it under
    another factor silently trains on latents of the wrong variance. Only the safetensors header is read (a pickled
    .ckpt would have to be loaded whole); checkpoints without a config (SD1.5 files) pass.
    """
    if Path(path).suffix.lower() not in SAFETENSORS_SUFFIXES:
        return
    embedded = config_from_metadata(read_metadata(path), where)
    if embedded is None:
        return
    theirs, ours = embedded.model.first_stage.scale_factor, cfg.model.first_stage.scale_factor
    if abs(theirs - ours) > 1e-6 * max(abs(theirs), 1.0):
        raise ConfigError(f"{where} was made with model.first_stage.scale_factor={theirs} but the config has {ours}: "
                          f"add model.first_stage.scale_factor={theirs} (or use the config it was made with)")


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(to_yaml(cfg), encoding="utf-8")
    tmp.replace(path)
    return path
