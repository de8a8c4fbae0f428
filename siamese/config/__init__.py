"""Experiment configuration: one typed schema for the YAML files in ``configs/``, validated before anything is built.

- ``schema``: the frozen dataclasses, one per YAML section (``model``, ``method``, ``data``, ``train``, ``sample``,
  ``pretrain``; ``maskgen`` from ``maskgen``: the schema knows every section, whichever room uses it).
- ``loading``: ``load_config`` (defaults ← YAML ← ``key=value`` overrides), ``check`` (relations between sections),
  ``save_config``.
- ``metadata``: the config, kind and provenance a checkpoint carries in its safetensors metadata.

May import ``ldm``, ``cldm`` and the method's own small value types (``siamese.losses``, ``siamese.schedules``);
nothing here builds a network (``siamese.factory`` does).
"""

from siamese.config.loading import (
    ConfigError,
    check,
    config_hash,
    load_config,
    save_config,
    stage_config,
    to_yaml,
    with_data_prompt,
)
from siamese.config.maskgen import PREDICTIONS, MaskGenConfig, MaskUNetSettings
from siamese.config.metadata import (
    METADATA_CONFIG,
    METADATA_CONFIG_HASH,
    METADATA_KIND,
    check_same_latents,
    checkpoint_metadata,
    checkpoint_provenance,
    config_from_metadata,
)
from siamese.config.schema import (
    LOSS_REGIONS,
    PRETRAIN_STAGES,
    AutoencoderPretrain,
    DataConfig,
    DDConfig,
    EMAConfig,
    ExperimentConfig,
    FirstStageConfig,
    MethodConfig,
    ModelConfig,
    PretrainConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
    UNetPretrain,
)

__all__ = [
    "LOSS_REGIONS", "METADATA_CONFIG", "METADATA_CONFIG_HASH", "METADATA_KIND", "PREDICTIONS", "PRETRAIN_STAGES",
    "AutoencoderPretrain", "ConfigError", "DDConfig", "DataConfig", "EMAConfig", "ExperimentConfig",
    "FirstStageConfig", "MaskGenConfig", "MaskUNetSettings", "MethodConfig", "ModelConfig", "PretrainConfig",
    "SampleConfig", "ScheduleConfig", "TrainConfig", "UNetPretrain", "check", "check_same_latents",
    "checkpoint_metadata", "checkpoint_provenance", "config_from_metadata", "config_hash", "load_config",
    "save_config", "stage_config", "to_yaml", "with_data_prompt",
]
