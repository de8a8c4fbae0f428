"""Explicit, reusable train/test splits of a real dataset, and the check that no test image reaches training.

The paper's claims are downstream numbers on held-out real data; the first way such numbers go wrong is leakage.
A split is written once to ``splits.json`` (seeded, at file level, or at patient level when a regex extracts a
patient id from the file name so that all images of one patient fall on the same side) and reused by every later
run, which refuses a split file made from another dataset. ``check_no_leak`` verifies, rather than assumes, that no
test pair is in the training set: not by path, not by image content (sha256), and not as the conditioning mask of a
synthetic pair (a generated image of a test mask carries the test lesion's shape into training).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import write_json_atomic

import numpy as np

from siamese.data.layout import PROMPT_FILE, read_prompt_jsonl

logger = logging.getLogger(__name__)

SPLITS_FILE = "splits.json"


@dataclass(frozen=True)
class Pair:
    """A real (or synthetic) pair on disk: its name, image, mask and, for synthetic pairs, the source mask."""

    name: str
    image: Path
    mask: Path
    source: Path | None = None


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def real_pairs(root: str | Path) -> list[Pair]:
    """The pairs of a dataset in the training layout (``prompt.json`` + images + masks)."""
    root = Path(root)
    prompt_file = root if root.is_file() else root / PROMPT_FILE
    records = read_prompt_jsonl(prompt_file, require_target=True)
    return [Pair(r.source.stem, Path(r.target), Path(r.source)) for r in records if r.target is not None]


def make_split(pairs: list[Pair], *, test_fraction: float, seed: int, group_regex: str | None = None
               ) -> dict[str, list[str]]:
    """Seeded split of pair names into ``train`` / ``test``; with ``group_regex`` (its first group, or the whole
    match, is the patient id) whole groups go to one side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    groups: dict[str, list[str]] = {}
    pattern = re.compile(group_regex) if group_regex else None
    for pair in pairs:
        key = pair.name
        if pattern is not None:
            match = pattern.search(pair.name)
            if match is None:
                raise ValueError(f"--group-regex {group_regex!r} does not match the file name {pair.name!r}")
            key = match.group(1) if match.groups() else match.group(0)
        groups.setdefault(key, []).append(pair.name)
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test = max(1, round(test_fraction * len(keys)))
    if n_test >= len(keys):
        raise ValueError(f"{len(keys)} {'groups' if pattern else 'pairs'} are too few for a train/test split")
    test_keys = {keys[i] for i in order[:n_test]}
    test = sorted(n for k in test_keys for n in groups[k])
    train = sorted(n for k in keys if k not in test_keys for n in groups[k])
    return {"train": train, "test": test}


def load_or_make_split(out: Path, pairs: list[Pair], *, test_fraction: float, seed: int,
                       group_regex: str | None = None) -> dict[str, list[str]]:
    """``out/splits.json``: made once, then reused; refused when it does not describe ``pairs``."""
    path = out / SPLITS_FILE
    names = {p.name for p in pairs}
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        listed = set(saved["train"]) | set(saved["test"])
        if listed != names:
            raise ValueError(f"{path} lists {len(listed)} pairs, the dataset has {len(names)} ({len(listed ^ names)} "
                             "differ): it belongs to another dataset; use another --out or delete it")
        logger.info("reusing the split in %s (%d train, %d test)", path, len(saved["train"]), len(saved["test"]))
        return {"train": saved["train"], "test": saved["test"]}
    split = make_split(pairs, test_fraction=test_fraction, seed=seed, group_regex=group_regex)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**split, "seed": seed, "test_fraction": test_fraction, "group_regex": group_regex},
                      indent=1)
    logger.info("wrote the split %s (%d train, %d test, seed %d)", path, len(split["train"]), len(split["test"]), seed)
    return split


def check_no_leak(train: Iterable[Pair], test: Iterable[Pair]) -> None:
    """Raise if any test pair reaches training: same image or mask path, same image content, or a training pair
    (real or synthetic) conditioned on a test mask."""
    test = list(test)
    test_paths = {p.image.resolve() for p in test} | {p.mask.resolve() for p in test}
    test_digests = {file_digest(p.image): p.name for p in test}
    test_masks = {file_digest(p.mask): p.name for p in test}
    for pair in train:
        for path in (pair.image, pair.mask) + ((pair.source,) if pair.source else ()):
            if path.resolve() in test_paths:
                raise ValueError(f"test data in training: {pair.name} uses {path}, a file of the test split")
        digest = file_digest(pair.image)
        if digest in test_digests:
            raise ValueError(f"test data in training: the image of {pair.name} is identical to test image "
                             f"{test_digests[digest]}")
        if pair.source is not None and pair.source.is_file():
            source_digest = file_digest(pair.source)
            if source_digest in test_masks:
                raise ValueError(f"test data in training: synthetic pair {pair.name} was generated from the mask of "
                                 f"test pair {test_masks[source_digest]}")
