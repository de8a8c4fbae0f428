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


def test_refused_evaluations_leave_no_output(tmp_path):
    """Inputs are checked before any work: a folder that is not a sampling run, a missing Inception file or a bad
    number is refused in one line, and no output folder (splits.json, a trained segmenter) is left behind."""
    from siamese.data.synthetic import write_synthetic_dataset
    from tools import evaluate, segmentation_benchmark

    write_synthetic_dataset(tmp_path / "real", 8, 32)
    (tmp_path / "not_pairs").mkdir()
    base = ["--real", str(tmp_path / "real"), "--synthetic", str(tmp_path / "not_pairs"), "--no-progress"]
    cases = [(evaluate.main, [*base, "--out", str(tmp_path / "a")]),
             (evaluate.main, [*base, "--out", str(tmp_path / "b"), "--inception", str(tmp_path / "none.pth")]),
             (evaluate.main, [*base, "--out", str(tmp_path / "c"), "--test-fraction", "1.5"]),
             (segmentation_benchmark.main, [*base, "--out", str(tmp_path / "d"), "--test-fraction", "1.5"])]
    for main, argv in cases:
        assert main(argv) == 1
    assert not any((tmp_path / name).exists() for name in "abcd")


HELP_PROBE = """
import importlib, runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'open_clip', 'pytorch_lightning', 'deepspeed'):
            raise ImportError(f'{name} imported while printing --help of {sys.argv[0]}')
sys.meta_path.insert(0, NoTorch())
for target in sys.argv[1:]:
    sys.argv = [target, '--help']
    try:
        runpy.run_path(target, run_name='__main__') if target.endswith('.py') else runpy.run_module(
            target, run_name='__main__', alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), (target, exc.code)
    else:
        raise AssertionError(f'{target} --help did not exit')
"""


def test_every_tool_prints_help_without_importing_torch():
    """``--help`` of every command-line tool stays under a second because it imports no torch, open_clip, Lightning
    or DeepSpeed: a tool that imports one at module level fails here (``bench/help_time.py`` measures the time)."""
    tools = sorted(f"tools.{p.stem}" for p in (REPO / "tools").glob("*.py")
                   if not p.stem.startswith("_") and "\ndef main(" in p.read_text())
    scripts = ["tutorial_train.py", "tutorial_inference.py", "tool_add_control.py", "tool_merge_control.py",
               "zero_to_fp32.py"]
    done = subprocess.run([sys.executable, "-c", HELP_PROBE, *tools, *scripts], cwd=REPO, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
