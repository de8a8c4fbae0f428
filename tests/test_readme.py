"""The documentation's shell blocks that are marked runnable, run exactly as written (each line a fresh process), and
its links, so they stay true.

A block is runnable when the line directly above its ```bash fence is ``<!-- runnable -->`` (README.md and
docs/*.md). The main one is the tiny end-to-end workflow in docs/workflow.md, the block after "The whole workflow on
the tiny config by hand". ``python X.py`` becomes this interpreter on the repository's script, lines starting with
``#`` are skipped, and the lines run in a scratch directory that sees the repository's ``configs/`` and
``data/pretrained/`` (the relative paths of the docs then resolve as they do for a user in a checkout).
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
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_DOC = REPO / "docs" / "workflow.md"
ANCHOR = "The whole workflow on the tiny config by hand"
MARK = "<!-- runnable -->"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def workflow_commands() -> list[str]:
    text = WORKFLOW_DOC.read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text[text.index(ANCHOR):], re.S)
    assert block, f"docs/workflow.md: no bash block after {ANCHOR!r}"
    return _commands(block.group(1))


def runnable_blocks() -> list[tuple[str, list[str]]]:
    """(file:line, commands) of every block marked runnable in README.md and docs/*.md."""
    blocks = []
    for path in doc_files():
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(re.escape(MARK) + r"\n```bash\n(.*?)```", text, re.S):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{path.relative_to(REPO)}:{line}", _commands(match.group(1))))
    return blocks


def run_as_written(commands: list[str], tmp_path: Path) -> None:
    """Each line a fresh process in ``tmp_path``, which sees the repository's configs/ and data/pretrained/.

    30 min per line: the tiny training's 100 steps take ≈ 1.5 min on an idle host, ≈ 20 on a loaded shared one."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "pretrained").symlink_to(REPO / "data" / "pretrained")  # the shipped tiny base
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        argv[0] = sys.executable
        if argv[1].endswith(".py"):
            argv[1] = str(REPO / argv[1])
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"


def test_readme_tiny_workflow_runs_as_written(tmp_path):
    commands = workflow_commands()
    assert [c.split()[1] for c in commands] == ["-m", "-m", "tool_add_control.py", "tutorial_train.py",
                                                "zero_to_fp32.py", "tool_merge_control.py", "tutorial_inference.py"]
    assert commands in [c for _, c in runnable_blocks()], "the tiny workflow block is not marked runnable"
    run_as_written(commands, tmp_path)
    synth = tmp_path / "runs" / "demo_by_hand" / "synth"
    masks = sorted((synth / "masks").glob("*.png"))
    assert len(masks) == 32 and (synth / "grid.png").is_file()
    assert set(np.unique(cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)).tolist()) <= {0, 255}


_OTHER_BLOCKS = [(where, c) for where, c in runnable_blocks() if c != workflow_commands()]


def test_runnable_blocks_are_found():
    assert len(runnable_blocks()) >= 2
    assert all(commands for _, commands in runnable_blocks())


@pytest.mark.parametrize("commands", [c for _, c in _OTHER_BLOCKS], ids=[w for w, _ in _OTHER_BLOCKS])
def test_runnable_block_runs_as_written(commands, tmp_path):
    """Every other marked block (the tiny workflow runs in the test above, with its checks)."""
    run_as_written(commands, tmp_path)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces as hyphens)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")
        counts[slug] = n + 1
    return anchors


def test_local_links_resolve():
    """Every markdown link to a local file in README.md and docs/*.md names a file or folder of the repository, and
    a #fragment into a markdown file names one of its headings."""
    broken = []
    for path in doc_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL (https:, mailto:) or an anchor in the same file
            local = (path.parent / target.split("#", 1)[0]).resolve()
            if not local.exists() or REPO not in (local, *local.parents):
                broken.append(f"{path.relative_to(REPO)}: {target}")
            elif "#" in target and local.suffix == ".md" and target.split("#", 1)[1] not in _anchors(local):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
        for target in re.findall(r"\]\((#[^)\s]+)\)", text):
            if target[1:] not in _anchors(path):
                broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []
