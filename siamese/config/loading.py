"""Loading an experiment config: schema defaults ← YAML file ← ``key=value`` overrides, then cross-section checks.

OmegaConf merges a YAML file and overrides onto the schema (``siamese.config.schema``), so unknown keys and wrong
types fail with the offending key named, before any weights load. ``check`` then validates relations between
sections. ``siamese.factory`` is the one place where a config becomes objects.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from ldm.fileio import write_text_atomic
from ldm.settings import BETA_KINDS, SAMPLERS

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from siamese.config.schema import LOSS_REGIONS, PRETRAIN_STAGES, ExperimentConfig


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
        fail(f"data.mask_threshold must be an 8-bit gray level in 0..254 or null (automatic: label masks "
             f"(0/1, 0/k ≤ 127, class maps) → foreground = any label, others → gray > 127), got {threshold}")
    from siamese.data.images import parse_intensity  # here: config loading stays free of OpenCV

    try:
        parse_intensity(cfg.data.intensity)
    except ValueError as error:
        fail(f"data.intensity: {error}")
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


def with_data_prompt(cfg: ExperimentConfig, prompts: list[str]) -> tuple[ExperimentConfig, str | None]:
    """``sample.prompt: null`` resolved to the training data's prompt (the most common one), with a line saying so; an
    explicit ``sample.prompt`` is kept, and so is null for data without prompts (message None). The resolved
    config is what the run saves and every checkpoint it exports embeds, so sampling from a mask folder,
    validation and the image log use the data's prompt unless told otherwise."""
    if cfg.sample.prompt is not None or not prompts:
        return cfg, None
    counts: dict[str, int] = {}
    for prompt in prompts:
        counts[prompt] = counts.get(prompt, 0) + 1
    top = max(counts, key=lambda p: (counts[p], -list(counts).index(p)))
    others = f"; {len(counts) - 1} other prompt(s) keep theirs in prompt.json lines" if len(counts) > 1 else ""
    message = (f"sample.prompt: {top!r}, the training data's prompt ({counts[top]} of {len(prompts)} pairs{others}); "
               "sampling from a mask folder uses it unless --prompt is given")
    return replace(cfg, sample=replace(cfg.sample, prompt=top)), message


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: ExperimentConfig) -> str:
    """Short stable hash of the resolved configuration (for manifests and run names)."""
    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:16]


def save_config(cfg: ExperimentConfig, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, to_yaml(cfg))
