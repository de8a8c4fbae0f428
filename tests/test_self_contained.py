"""The repository is self-contained: no tracked file reaches for data outside it (a user's clone has nothing beside
it), and the reference data the parity tests read is tracked."""

from __future__ import annotations

import re
import subprocess

import pytest

# Paths that leave the repository: a sibling "shared" folder (where this project's reference data once lived), or a
# test that climbs above the repository root with parents[2].
OUTSIDE = re.compile(r"\.\./shared|/shared/reference|parents\[2\]")


def _tracked(repo_root) -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=repo_root, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return out.splitlines()


def test_no_tracked_file_reads_outside_the_repository(repo_root) -> None:
    offenders = []
    for name in _tracked(repo_root):
        path = repo_root / name
        if name == "tests/test_self_contained.py" or path.suffix not in {".py", ".md", ".yaml", ".toml", ".sh", ""}:
            continue
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert offenders == []


def test_reference_data_is_tracked(repo_root) -> None:
    tracked = set(_tracked(repo_root))
    for name in ("official_controlldm_sd15_keys.json", "golden_tiny.json", "golden.py", "make_golden.py"):
        assert f"tests/reference/{name}" in tracked, name
