"""Explicit, reusable train/test splits of a real dataset, and the check that no test image reaches training.

The paper's claims are downstream numbers on held-out real data; the first way such numbers go wrong is leakage.
A split is written once to ``splits.json`` (seeded, at file level, or at patient level when a regex extracts a
patient id from the file name so that all images of one patient fall on the same side) and reused by every later
run, which refuses a split file made from another dataset; a ``tools.split`` output (``OUT/train``, ``OUT/test``) is
used as it is. ``check_no_leak`` verifies, rather than assumes, that no
test pair is in the training set: not by path, not by image content (sha256), and not as the conditioning mask of a
synthetic pair (a generated image of a test mask carries the test lesion's shape into training).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import write_json_atomic

from siamese.data.split import SPLITS_FILE, Pair, is_split_dataset, make_split, read_split_dataset, real_pairs

__all__ = ["SPLITS_FILE", "Pair", "RealSplit", "check_no_leak", "file_digest", "load_or_make_split", "make_split",
           "real_pairs", "real_split"]

logger = logging.getLogger(__name__)

def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class RealSplit:
    """The real pairs of both sides and where the split came from (for reports)."""

    train: list[Pair]
    test: list[Pair]
    origin: str
    pending: tuple[Path, dict] | None = None  # a new split, written by save()

    def save(self) -> None:
        """Write a newly made ``splits.json`` (after the checks that may still refuse the run)."""
        if self.pending is not None:
            path, record = self.pending
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, record, indent=1)
            logger.info("wrote the split %s (%d train, %d test)", path, len(self.train), len(self.test))


def real_split(real: str | Path, out: str | Path, *, test_fraction: float, seed: int,
               group_regex: str | None = None) -> RealSplit:
    """The train/test split of ``real``: a ``tools.split`` output is used as it is (checked against its
    ``splits.json``); a plain dataset is split here, once, into ``out/splits.json`` (reused by later runs)."""
    real = Path(real)
    if is_split_dataset(real):
        sides = read_split_dataset(real)
        return RealSplit(sides["train"], sides["test"], f"{real / SPLITS_FILE} (python -m tools.split)")
    pairs = real_pairs(real)
    split = load_or_make_split(Path(out), pairs, test_fraction=test_fraction, seed=seed, group_regex=group_regex,
                               write=False)
    by_name = {p.name: p for p in pairs}
    pending = (Path(out) / SPLITS_FILE, split["pending"]) if "pending" in split else None
    return RealSplit([by_name[n] for n in split["train"]], [by_name[n] for n in split["test"]],
                     f"{Path(out) / SPLITS_FILE} (seed {seed}, test fraction {test_fraction:g})", pending)


def load_or_make_split(out: Path, pairs: list[Pair], *, test_fraction: float, seed: int,
                       group_regex: str | None = None, write: bool = True) -> dict[str, list[str]]:
    """``out/splits.json``: made once, then reused; refused when it does not describe ``pairs``. ``write=False``
    makes a new split without writing it (``RealSplit.save`` does, once every check has passed)."""
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
    if not write:
        return {**split, "pending": {**split, "seed": seed, "test_fraction": test_fraction, "group_regex": group_regex}}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**split, "seed": seed, "test_fraction": test_fraction, "group_regex": group_regex},
                      indent=1)
    logger.info("wrote the split %s (%d train, %d test, seed %d)", path, len(split["train"]), len(split["test"]), seed)
    return split


def check_no_leak(train: Iterable[Pair], test: Iterable[Pair]) -> None:
    """Raise if any test pair reaches training: same image or mask path, same image content, or a training pair
    conditioned on a test mask. The last line of defence on the pairs themselves; what the models behind synthetic
    pairs saw is ``siamese.evaluation.leaks``' job."""
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
