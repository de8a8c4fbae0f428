"""The README's tiny end-to-end workflow, run exactly as written (each line a fresh process), so it stays true.

The commands are read from the README's code block after "The whole workflow on the tiny config by hand";
``python X.py`` becomes this interpreter on the repository's script, and they run in a scratch directory that sees
the repository's ``configs/`` and ``data/pretrained/`` (the relative paths of the README then resolve as they do for
a user in a checkout).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
ANCHOR = "The whole workflow on the tiny config by hand"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")


def workflow_commands() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(ANCHOR):], re.S)
    assert block, f"README: no bash block after {ANCHOR!r}"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_readme_tiny_workflow_runs_as_written(tmp_path):
    commands = workflow_commands()
    assert [c.split()[1] for c in commands] == ["-m", "-m", "tool_add_control.py", "tutorial_train.py",
                                                "zero_to_fp32.py", "tool_merge_control.py", "tutorial_inference.py"]
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pretrained").symlink_to(REPO / "data" / "pretrained")  # the shipped tiny base
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python"
        argv[0] = sys.executable
        if argv[1].endswith(".py"):
            argv[1] = str(REPO / argv[1])
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    synth = tmp_path / "runs" / "demo_by_hand" / "synth"
    masks = sorted((synth / "masks").glob("*.png"))
    assert len(masks) == 32 and (synth / "grid.png").is_file()
    assert set(np.unique(cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)).tolist()) <= {0, 255}
