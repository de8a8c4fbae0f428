"""Crash-safe writes (``ldm.fileio``): files via a temporary name, folders built aside and swapped in, and a swap a
crash interrupted found and finished by the next run; old import paths of moved modules; the shared IoU formula and
the one resize rule."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

from ldm.fileio import (
    atomic_path,
    copy_file_atomic,
    old_dir,
    replace_dir,
    restore_dir,
    write_json_atomic,
    write_text_atomic,
)

import numpy as np
import pytest

from cldm.checkpoints import find_latest_checkpoint
from siamese.data.images import resize_image
from siamese.evaluation.metrics import iou, iou_matrix


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_file_writes_leave_the_old_file_on_error_and_no_temporary(tmp_path):
    target = tmp_path / "report.json"
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    write_text_atomic(target, "new")
    copy_file_atomic(target, tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy.txt", "report.json"]  # no temporary left


def test_replace_dir_swaps_in_a_complete_folder_or_nothing(tmp_path):
    out = tmp_path / "pairs"
    with replace_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    assert _tree(out) == {"a.txt": "old"}
    with pytest.raises(ValueError), replace_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise ValueError("a refused input halfway")
    assert _tree(out) == {"a.txt": "old"}  # the old output, whole
    with replace_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
    assert _tree(out) == {"b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]


_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from ldm import fileio

    out = Path(sys.argv[1])
    real = os.replace
    calls = []

    def crash_after_first(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) == 1:  # the old folder is parked, the new one not yet in place: the process dies here
            os._exit(3)

    with fileio.replace_dir(out) as tmp:
        (tmp / "b.txt").write_text("new")
        fileio.os.replace = crash_after_first
""")


def test_a_crash_between_the_two_renames_leaves_the_old_folder_for_the_next_run(tmp_path, repo_root):
    out = tmp_path / "pairs"
    with replace_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(out)], cwd=repo_root, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert not out.exists() and _tree(old_dir(out)) == {"a.txt": "old"}  # neither in place: only parked
    # The next run finds the parked folder first; a run that then fails leaves it restored, not lost.
    with pytest.raises(OSError), replace_dir(out) as tmp:
        raise OSError("disk full")
    assert _tree(out) == {"a.txt": "old"} and not old_dir(out).exists()
    # Crash after the second rename (only the deletion lost): the new folder stays, the parked one goes.
    old_dir(out).mkdir()
    assert restore_dir(out) is False and not old_dir(out).exists() and _tree(out) == {"a.txt": "old"}


def test_find_latest_checkpoint_restores_a_checkpoint_a_crash_left_parked(tmp_path):
    parked = tmp_path / ".step=4.ckpt.old"
    (parked / "checkpoint").mkdir(parents=True)
    find_latest_checkpoint(tmp_path, warn=False)
    assert (tmp_path / "step=4.ckpt" / "checkpoint").is_dir() and not parked.exists()


MOVED = [("siamese.masks", "siamese.data.masks", "read_mask"), ("siamese.pairs_io", "siamese.data.pairs", "PairWriter"),
         ("siamese.data_check", "siamese.data.check", "check_dataset"),
         ("siamese.maskgen_config", "siamese.config.maskgen", "MaskGenConfig"),
         ("siamese.evaluation.filtering", "siamese.meddiff.filtering", "judge")]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_old_import_paths_give_the_moved_module_with_a_warning(old, new, name):
    code = (f"import warnings, importlib; warnings.simplefilter('error', DeprecationWarning)\n"
            f"import siamese\ntry:\n    from {old} import {name}\nexcept DeprecationWarning as w:\n    print(w)\n"
            f"warnings.simplefilter('ignore')\nfrom {old} import {name} as a\nfrom {new} import {name} as b\n"
            f"import sys\nassert a is b and sys.modules['{old}'] is sys.modules['{new}']\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr
    assert f"{old} moved to {new}" in proc.stdout


def test_former_siamese_data_names_still_import():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from siamese.data import read_prompt_jsonl
        from siamese.data.layout import read_prompt_jsonl as moved
    assert read_prompt_jsonl is moved and "siamese.data.layout" in str(caught[0].message)
    with pytest.raises(ImportError):
        from siamese.data import no_such_name  # noqa: F401


def test_iou_matrix_is_the_pairwise_iou():
    rng = np.random.default_rng(0)
    a = rng.random((5, 9, 7)) > 0.6
    b = rng.random((4, 9, 7)) > 0.5
    a[0] = False
    b[1] = False  # empty against empty → 1, empty against non-empty → 0
    got = iou_matrix(a, b)
    assert got.shape == (5, 4)
    np.testing.assert_array_equal(got, [[iou(x, y) for y in b] for x in a])
    with pytest.raises(ValueError, match="different sizes"):
        iou_matrix(a, b[:, :8])


def test_resize_rule_area_down_cubic_up_identity_same():
    import cv2

    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert resize_image(big, (40, 60)) is big
    np.testing.assert_array_equal(resize_image(big, 20), cv2.resize(big, (20, 20), interpolation=cv2.INTER_AREA))
    # Any side growing (here the height: 40 → 50) means bicubic, also when the other side shrinks.
    np.testing.assert_array_equal(resize_image(big, 50), cv2.resize(big, (50, 50), interpolation=cv2.INTER_CUBIC))
    assert resize_image(big, (10, 30)).shape == (10, 30, 3)


def test_no_temporary_names_in_the_library_outside_fileio(repo_root):
    """Every hand-written temporary-then-rename is gone: os.replace appears only where its semantics are special
    (the checkpoint writer's O_EXCL temporary, Lightning's single-file checkpoint) and in ldm/fileio.py."""
    allowed = {"ldm/fileio.py", "ldm/checkpoint.py", "cldm/strategy.py"}
    found = []
    for package in ("ldm", "cldm", "siamese", "tools"):
        for path in (repo_root / package).rglob("*.py"):
            rel = path.relative_to(repo_root).as_posix()
            if rel not in allowed and "os.replace(" in path.read_text(encoding="utf-8"):
                found.append(rel)
    assert found == []
