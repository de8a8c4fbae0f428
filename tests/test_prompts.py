"""Prompts follow the data: ``sample.prompt: null`` becomes the training data's prompt when a run starts (saved in
its config, embedded in every checkpoint it exports), sampling from a mask folder uses it, an explicit prompt wins,
and a model that records none refuses folder sampling instead of guessing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from siamese.config import load_config, with_data_prompt
from siamese.data.synthetic import write_synthetic_dataset
from siamese.sampling import collect_masks

TINY = Path(__file__).resolve().parents[1] / "configs" / "siamese_tiny.yaml"


def test_null_sample_prompt_becomes_the_datas_most_common_prompt():
    cfg = load_config(TINY)
    assert cfg.sample.prompt is None
    resolved, said = with_data_prompt(cfg, ["A dermoscopy image."] * 3 + ["A photo of a polyp."])
    assert resolved.sample.prompt == "A dermoscopy image." and "3 of 4 pairs" in said and "1 other" in said
    explicit = load_config(TINY, ["sample.prompt=An ultrasound image."])
    assert with_data_prompt(explicit, ["A dermoscopy image."]) == (explicit, None)  # the user's setting wins


def test_folder_sampling_uses_the_models_prompt_or_refuses(tmp_path, caplog):
    write_synthetic_dataset(tmp_path / "d", 2, 32, prompt="A dermoscopy image.")
    masks = tmp_path / "d" / "masks"
    assert {s.prompt for s in collect_masks(masks, default_prompt="A dermoscopy image.")} == {"A dermoscopy image."}
    assert {s.prompt for s in collect_masks(masks, default_prompt=None, prompt_override="x")} == {"x"}
    # A prompt.json keeps each line's prompt whatever the model records.
    assert {s.prompt for s in collect_masks(tmp_path / "d" / "prompt.json", default_prompt=None)} == {
        "A dermoscopy image."}
    with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="records none .* pass --prompt"):
        collect_masks(masks, default_prompt=None)
