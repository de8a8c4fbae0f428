"""Every refusal of the configuration (``siamese.config``): one line naming the key, before anything is built."""

from __future__ import annotations

from pathlib import Path

import pytest

from siamese.config import ConfigError, load_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"

RULES = [
    (["model.first_stage.kind=vqgan"], "model.first_stage.kind 'vqgan' is not one of"),
    (["model.unet.in_channels=3"], "model.unet in/out_channels (3/4) must equal the first stage's latent channels (4)"),
    (["model.text_encoder.width=64"], "model.text_encoder.width 64 must equal model.unet.context_dim 32"),
    (["model.schedule.beta_schedule=cosine_wrong"], "model.schedule.beta_schedule 'cosine_wrong' is not one of"),
    (["data.resolution=60"], "data.resolution 60 must be a multiple of 16"),
    (["method.name=dreambooth"], "method.name 'dreambooth' is not one of ['siamese', 'controlnet']"),
    (["method.name=controlnet"], "method.name=controlnet trains the mask branch only"),
    (["method.prompt_dropout=1.5"], "method.prompt_dropout must be in [0, 1]"),
    (["method.image_ramp=cubic"], "image_ramp"),
    (["method.aug_noise=pink"], "aug_noise"),
    (["train.precision=64"], "train.precision '64' is not one of"),
    (["train.batch_size=0"], "train.batch_size must be > 0"),
    (["train.total_steps=0"], "train.total_steps must be > 0"),
    (["train.checkpoint_every=0"], "train.checkpoint_every must be > 0"),
    (["train.log_every=-1"], "train.log_every must be > 0"),
    (["train.lr=0"], "train.lr must be > 0"),
    (["data.synthetic_samples=0"], "data.synthetic_samples must be > 0 when data.root is null"),
    (["data.mask_threshold=300"], "mask_threshold"),
    (["pretrain.autoencoder.batch_size=0"], "pretrain.autoencoder.batch_size must be > 0"),
    (["pretrain.unet.lr=-1"], "pretrain.unet.lr must be > 0"),
    (["pretrain.autoencoder.kl_weight=-1"], "kl_weight, perceptual_weight and calibrate_samples must be >= 0"),
    (["pretrain.autoencoder.perceptual_weight=1"], "needs pretrain.autoencoder.perceptual_weights"),
    (["pretrain.unet.prompt_dropout=2"], "pretrain.unet.prompt_dropout must be in [0, 1]"),
    (["sample.sampler=euler"], "sample.sampler 'euler' is not one of ['ddim', 'dpmpp_2m', 'unipc']"),
    (["sample.cfg_mask=-1"], "sample.cfg_mask must be >= 0 or null, got -1.0"),
    (["train.lrr=1"], "train.lrr"),  # a typo
    (["train.lr=fast"], "train.lr"),  # a wrong type
    (["no_equals_sign"], "is not of the form key=value"),
]


@pytest.mark.parametrize(("overrides", "message"), RULES, ids=[r[0][0] for r in RULES])
def test_each_rule_refuses_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_the_presets_are_valid():
    for path in sorted(TINY.parent.glob("*.yaml")):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
