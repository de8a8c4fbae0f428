"""The one-way import flow ``ldm <- cldm <- siamese <- tools <- root scripts``, checked statically with ``ast``.

A module may import from its own layer and the layers to its left, never to its right. ``ldm`` (pure PyTorch) must
also stay free of Lightning and DeepSpeed, which are allowed from ``cldm`` on. Inside ``siamese`` the rooms flow the
same way: ``siamese.data`` <- the method (``siamese.*`` modules, ``siamese.config``) <- ``siamese.evaluation`` <- the
model families (``siamese.meddiff``, ``siamese.volumes``, ``siamese.segdiff``), which do not import each other. Every
``import``/``from ... import`` (relative ones resolved, ``TYPE_CHECKING`` blocks included) and every
``importlib.import_module("...")`` with a literal name counts.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGES = ("ldm", "cldm", "siamese", "tools")
ROOT_LAYER = len(PACKAGES)  # the root scripts (tutorial_train.py, tool_*.py, ...) sit above tools
TRAINING_FRAMEWORKS = ("pytorch_lightning", "lightning", "lightning_fabric", "deepspeed")
# Rooms of siamese, by rank; a module may import rooms of a lower rank and its own room. Families share a rank and
# must not import one another.
ROOM_RANK = {"data": 0, "method": 1, "evaluation": 2, "meddiff": 3, "volumes": 3, "segdiff": 3}


def room_of(module: str) -> str | None:
    """The room of a ``siamese`` module name (``siamese.data.masks`` → data, ``siamese.model`` → method)."""
    parts = module.split(".")
    if parts[0] != "siamese" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in ROOM_RANK else "method"


def _python_files(root: Path) -> Iterator[tuple[Path, int, str | None]]:
    """(file, layer, package) for every module of the four packages and every root script."""
    for layer, package in enumerate(PACKAGES):
        for path in sorted((root / package).rglob("*.py")):
            yield path, layer, package
    for path in sorted(root.glob("*.py")):
        yield path, ROOT_LAYER, None


def _root_script_names(root: Path) -> set[str]:
    return {path.stem for path in root.glob("*.py")}


def _imported_modules(tree: ast.AST, path: Path, root: Path) -> Iterator[tuple[str, int]]:
    """(absolute module name, line) of every import in ``tree``."""
    parts = path.relative_to(root).with_suffix("").parts
    package_parts = parts[:-1]  # the package a relative import starts from (also right for __init__.py)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # "from . import x" in pkg/a.py is pkg; each extra dot climbs one package.
                base = package_parts[: len(package_parts) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            if module:
                # "from siamese import sampling" imports the module siamese.sampling: name what was imported (a
                # name inside a module, "from siamese.data.masks import read_mask", stays in that module's room).
                for alias in node.names:
                    yield f"{module}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, (ast.Attribute, ast.Name))
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


def find_violations(root: Path) -> list[str]:
    """Every wrong-way import under ``root`` as ``file:line: message``."""
    scripts = _root_script_names(root)
    layer_of = {package: layer for layer, package in enumerate(PACKAGES)}
    layer_of.update({name: ROOT_LAYER + 1 for name in scripts})  # nothing in the packages may import a root script
    problems = []
    for path, layer, package in _python_files(root):
        where = path.relative_to(root)
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except SyntaxError as exc:
            problems.append(f"{where}:{exc.lineno}: syntax error, cannot check imports")
            continue
        for module, line in _imported_modules(tree, path, root):
            top = module.split(".")[0]
            target = layer_of.get(top)
            if package is None and top in scripts:
                continue  # root scripts may share helpers among themselves
            if target is not None and target > layer:
                problems.append(f"{where}:{line}: {package or 'root script'} must not import {module}")
            elif package == "siamese" and top == "siamese":
                here = room_of(".".join(path.relative_to(root).with_suffix("").parts))
                there = room_of(module)
                if here and there and there != here and ROOM_RANK[there] >= ROOM_RANK[here]:
                    problems.append(f"{where}:{line}: the siamese room {here} must not import {module} ({there})")
            elif package == "ldm" and top in TRAINING_FRAMEWORKS:
                problems.append(f"{where}:{line}: ldm must stay pure PyTorch, not import {module}")
    return problems


def test_project_imports_flow_one_way(repo_root: Path) -> None:
    files = list(_python_files(repo_root))
    assert any(package == "ldm" for _, _, package in files), "found no module under ldm/: wrong repo_root?"
    problems = find_violations(repo_root)
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def _write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source, encoding="utf-8")


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("ldm/unet.py", "import cldm.model\n", "ldm/unet.py:1: ldm must not import cldm.model"),
        ("ldm/unet.py", "x = 1\nfrom siamese import losses\n", "ldm/unet.py:2: ldm must not import siamese"),
        ("ldm/unet.py", "import pytorch_lightning as pl\n", "ldm/unet.py:1: ldm must stay pure PyTorch"),
        ("ldm/unet.py", "from lightning.pytorch import Trainer\n", "ldm/unet.py:1: ldm must stay pure PyTorch"),
        (
            "ldm/sub/deep.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cldm.hint import DHI\n",
            "ldm/sub/deep.py:3: ldm must not import cldm.hint",
        ),
        ("ldm/unet.py", "import importlib\nimportlib.import_module('deepspeed')\n", "ldm/unet.py:2: ldm must stay"),
        ("cldm/model.py", "from siamese.losses import loss_mask\n", "cldm/model.py:1: cldm must not import siamese"),
        ("cldm/model.py", "from tools import train\n", "cldm/model.py:1: cldm must not import tools"),
        ("siamese/model.py", "import tools.train\n", "siamese/model.py:1: siamese must not import tools.train"),
        ("tools/train.py", "import tutorial_train\n", "tools/train.py:1: tools must not import tutorial_train"),
        ("siamese/data/masks.py", "from siamese.sampling import x\n",
         "siamese/data/masks.py:1: the siamese room data must not import siamese.sampling.x (method)"),
        ("siamese/config/schema.py", "from siamese.meddiff.maskgen import x\n",
         "siamese/config/schema.py:1: the siamese room method must not import siamese.meddiff.maskgen"),
        ("siamese/evaluation/x.py", "from siamese.meddiff import filtering\n",
         "siamese/evaluation/x.py:1: the siamese room evaluation must not import siamese.meddiff"),
        ("siamese/data/x.py", "from siamese import sampling\n",
         "siamese/data/x.py:1: the siamese room data must not import siamese.sampling (method)"),
        ("siamese/volumes/x.py", "import siamese.segdiff.model\n",
         "siamese/volumes/x.py:1: the siamese room volumes must not import siamese.segdiff.model (segdiff)"),
    ],
)
def test_checker_catches_wrong_way_imports(tmp_path: Path, relative: str, source: str, expected: str) -> None:
    for package in PACKAGES:
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "tutorial_train.py", "from tools import train\n")
    _write(tmp_path, relative, source)
    problems = find_violations(tmp_path)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_checker_allows_the_right_direction(tmp_path: Path) -> None:
    for package in PACKAGES:
        _write(tmp_path, f"{package}/__init__.py", "")
    _write(tmp_path, "ldm/unet.py", "import torch\nfrom . import attention\nfrom ldm.attention import x\n")
    _write(tmp_path, "cldm/model.py", "import pytorch_lightning as pl\nimport deepspeed\nfrom ldm import unet\n")
    _write(tmp_path, "siamese/model.py", "from cldm.model import ControlLDM\nfrom .losses import loss_mask\n")
    _write(tmp_path, "siamese/sampling.py", "from siamese.data.masks import read_mask\nfrom . import config\n")
    _write(tmp_path, "siamese/meddiff/x.py", "from siamese.evaluation import metrics\nfrom siamese import sampling\n")
    _write(tmp_path, "siamese/data/pairs.py", "from siamese.data.masks import x\nfrom . import images\n")
    _write(tmp_path, "tools/train.py", "from siamese import model\nfrom cldm import model as m\nimport ldm\n")
    _write(tmp_path, "tutorial_train.py", "import sys\nfrom tools.train import main\nsys.exit(main())\n")
    assert find_violations(tmp_path) == []
