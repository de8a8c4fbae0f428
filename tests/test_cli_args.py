"""Command lines as users type them: KEY=VALUE overrides anywhere among the options, and imports that leave torch and
open_clip out until they are needed (``--help`` is fast; ``python bench/help_time.py`` measures it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools import inference, maskgen, pretrain, repair_backgrounds, train

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("parse", "argv"), [
    (train.parse_args, ["a.b=1", "--dry-run", "c.d=2"]),
    (pretrain.parse_args, ["--config", "x.yaml", "a.b=1", "--dry-run", "c.d=2"]),
    (repair_backgrounds.parse_args, ["--ckpt", "k", "--data", "d", "--out", "o", "a.b=1",
                                     "--force", "c.d=2"]),
    (lambda argv: inference.build_parser().parse_intermixed_args(argv),
     ["--ckpt", "k", "--masks", "m", "--out", "o", "a.b=1", "--n-per-mask", "2", "c.d=2"]),
    (maskgen.parse_args, ["train", "--config", "x.yaml", "a.b=1", "--out", "o", "c.d=2"]),
])
def test_overrides_may_come_between_and_after_the_options(parse, argv):
    assert parse(argv).overrides == ["a.b=1", "c.d=2"]


def test_stray_words_are_still_refused():
    with pytest.raises(SystemExit):
        maskgen.parse_args(["sample", "--ckpt", "k", "--out", "o", "--n", "2", "a.b=1"])  # sample takes none
    with pytest.raises(SystemExit):
        maskgen.parse_args(["train", "--config", "x.yaml", "--out", "o", "--bogus"])


def test_importing_the_packages_and_the_config_stays_light():
    code = ("import sys, ldm, tools; heavy = sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in "
            "sys.modules); import siamese.config; print(heavy, 'open_clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False"]
