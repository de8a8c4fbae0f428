"""What a checkpoint says about itself: the resolved config and the kind of file, in its safetensors metadata.

Checkpoints written by the tools carry the resolved config, so a merged checkpoint is self-describing
(``tutorial_inference.py`` runs without ``--config``) and its latent scale can be checked against a new config.
"""

from __future__ import annotations

from pathlib import Path

from siamese.config.loading import ConfigError, config_hash, load_config, to_yaml
from siamese.config.schema import ExperimentConfig
from siamese.data.provenance import Provenance, external

METADATA_CONFIG = "siamese.config"
METADATA_CONFIG_HASH = "siamese.config_hash"
METADATA_KIND = "siamese.kind"
_SAFETENSORS = ".safetensors"  # only these carry metadata in their header (``ldm.checkpoint.SAFETENSORS_SUFFIXES``)


def checkpoint_metadata(cfg: ExperimentConfig | None, kind: str, provenance: Provenance | None = None,
                        **extra: str) -> dict[str, str]:
    """String metadata for a checkpoint: its kind (init / fp32 / merged / trainable), the config, what it was made
    from (``siamese.data.provenance``), extras."""
    meta = {METADATA_KIND: kind, **extra}
    if cfg is not None:
        meta[METADATA_CONFIG] = to_yaml(cfg)
        meta[METADATA_CONFIG_HASH] = config_hash(cfg)
    if provenance is not None:
        meta.update(provenance.to_metadata())
    return meta


def checkpoint_provenance(path: str | Path) -> Provenance:
    """What a checkpoint was made from: the provenance in its safetensors metadata; a file without one (an SD1.5
    release, a pickled .ckpt, a file written elsewhere) is one ``external`` record naming it."""
    path = Path(path)
    if path.suffix.lower() == _SAFETENSORS:
        from ldm.checkpoint import read_metadata  # torch: imported when a checkpoint is read, not with the config

        found = Provenance.from_metadata(read_metadata(path), str(path))
        if found is not None:
            return found
    return Provenance((external(f"checkpoint {path.name}", note="no provenance recorded: its training data is "
                                                                "unknown to the framework"),))


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
    if Path(path).suffix.lower() != _SAFETENSORS:
        return
    from ldm.checkpoint import read_metadata

    embedded = config_from_metadata(read_metadata(path), where)
    if embedded is None:
        return
    theirs, ours = embedded.model.first_stage.scale_factor, cfg.model.first_stage.scale_factor
    if abs(theirs - ours) > 1e-6 * max(abs(theirs), 1.0):
        raise ConfigError(f"{where} was made with model.first_stage.scale_factor={theirs} but the config has {ours}: "
                          f"add model.first_stage.scale_factor={theirs} (or use the config it was made with)")
