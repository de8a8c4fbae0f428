"""Shared pytest set-up: import order, offline mode, CPU threads, and the reference data in tests/reference.

``import ldm`` must come before anything that imports torchvision (open_clip, Lightning, torchmetrics): it installs
the CPU-only torchvision shim (ldm/_compat.py). The reference data of the original implementation (its SD1.5 key
manifest, the golden parity values) is part of the repository, so every test runs in any clone.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ldm  # noqa: F401  (torchvision shim: must precede any open_clip / lightning / torchvision import)

import numpy as np
import pytest
import torch

# Before any test imports huggingface_hub (it reads this at import): a failed hub look-up retries for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT / "tests" / "reference"
MANIFEST_NAME = "official_controlldm_sd15_keys.json"

# The CI machines have 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch so tests are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Every test starts from the same RNG state, whatever ran before it.
    seed_everything(0)


@pytest.fixture(scope="session")
def seed() -> Callable[[int], None]:
    """The seeding helper, for tests that re-seed mid-way."""
    return seed_everything


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def reference_manifest() -> dict[str, Any]:
    """``{"_about": ..., "keys": {name: [shape, dtype]}}`` of the original SD1.5 ControlLDM."""
    with (REFERENCE_DIR / MANIFEST_NAME).open(encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="session")
def init_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workflow's first step at the tiny geometry: a (random) SD base → tool_add_control.py → init checkpoint."""
    from ldm.checkpoint import save_state_dict

    from siamese.config import load_config
    from siamese.factory import build_model
    from tools import add_control

    tiny = REPO_ROOT / "configs" / "siamese_tiny.yaml"
    root = tmp_path_factory.mktemp("init")
    state = torch.random.get_rng_state()
    torch.manual_seed(7)
    base = {k: v for k, v in build_model(load_config(tiny).model).state_dict().items()
            if not k.startswith("control_model.")}
    torch.random.set_rng_state(state)
    save_state_dict(base, root / "sd_base.safetensors")
    assert add_control.main([str(root / "sd_base.safetensors"), str(root / "init.safetensors"),
                             "--config", str(tiny)]) == 0
    return root / "init.safetensors"


@pytest.fixture
def unwritable_dir(tmp_path: Path):
    """A directory this process cannot create files in: ``chmod 500`` for a user; ``/proc/self`` for root, which
    ignores permission bits (but cannot create files there either)."""
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        yield locked
        locked.chmod(0o700)
    elif Path("/proc/self").is_dir():
        yield Path("/proc/self")
    else:
        pytest.skip("root ignores directory permissions and there is no /proc to write into")
