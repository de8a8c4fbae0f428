"""Split first: a real dataset becomes ``OUT/train`` and ``OUT/test``, two datasets in the training layout.

Every generative model (base fine-tune, ControlNet, mask generator, background library) then trains on
``OUT/train`` only, and the evaluation tools score on ``OUT/test``. The split is seeded and made at file level, or
at patient level when ``--group-regex`` extracts a patient id from the file name (all images of one patient fall on
one side). Files are hard-linked (copied where links are impossible), never moved; ``OUT/splits.json`` lists both
sides with every file's digest, so a later run can tell that the folders are still what the split wrote.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import replace_dir, write_json_atomic, write_text_atomic

import numpy as np

from siamese.data.layout import PROMPT_FILE, read_prompt_jsonl
from siamese.data.pairs import link_or_copy
from siamese.data.provenance import digest_file

__all__ = ["SPLITS_FILE", "Pair", "is_split_dataset", "make_split", "read_split_dataset", "real_pairs",
           "write_split_dataset"]

SPLITS_FILE = "splits.json"
SIDES = ("train", "test")


@dataclass(frozen=True)
class Pair:
    """A pair on disk: its name, image, mask and prompt; for a synthetic pair also the mask it was generated from
    (``source``, with its digest) and the digest of the background it kept, if any."""

    name: str
    image: Path
    mask: Path
    prompt: str = ""
    source: Path | None = None
    source_digest: str | None = None
    background_digest: str | None = None


def real_pairs(root: str | Path) -> list[Pair]:
    """The pairs of a dataset in the training layout (``prompt.json`` + images + masks), named by the mask's stem;
    two pairs of one name are refused (a split or a result table keyed by name would confuse them)."""
    root = Path(root)
    prompt_file = root if root.is_file() else root / PROMPT_FILE
    pairs: dict[str, Pair] = {}
    for record in read_prompt_jsonl(prompt_file, require_target=True):
        assert record.target is not None
        name = record.source.stem
        if name in pairs:
            raise ValueError(f"{prompt_file}: two pairs are named {name!r} ({pairs[name].mask} and {record.source}): "
                             "mask file stems must be unique")
        pairs[name] = Pair(name, Path(record.target), Path(record.source), record.prompt)
    return list(pairs.values())


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


def is_split_dataset(root: str | Path) -> bool:
    """Whether ``root`` is a ``tools.split`` output (``splits.json``, ``train/`` and ``test/`` datasets)."""
    root = Path(root)
    return root.is_dir() and (root / SPLITS_FILE).is_file() and all((root / s / PROMPT_FILE).is_file() for s in SIDES)


def read_split_dataset(root: str | Path) -> dict[str, list[Pair]]:
    """The two sides of a ``tools.split`` output, checked against ``splits.json`` (names and file digests): a file
    edited or swapped after the split is refused in one line."""
    root = Path(root)
    try:
        saved = json.loads((root / SPLITS_FILE).read_text(encoding="utf-8"))
        listed = {side: dict(saved["files"][side]) for side in SIDES}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{root / SPLITS_FILE}: not a tools.split record ({exc})") from None
    sides = {}
    for side in SIDES:
        pairs = real_pairs(root / side)
        names = {p.name for p in pairs}
        differ = len(names ^ set(listed[side]))
        if differ:
            raise ValueError(f"{root / side}: its pairs are not the ones {SPLITS_FILE} lists ({differ} differ); make "
                             "the split again with python -m tools.split")
        for pair in pairs:
            image_digest, mask_digest = listed[side][pair.name]
            if digest_file(pair.image) != image_digest or digest_file(pair.mask) != mask_digest:
                raise ValueError(f"{root / side}: pair {pair.name} changed after the split ({SPLITS_FILE} has other "
                                 "digests); make the split again with python -m tools.split")
        sides[side] = pairs
    return sides


def _write_side(out: Path, pairs: list[Pair]) -> dict[str, list[str]]:
    """``out/images``, ``out/masks`` (links to the originals) and ``out/prompt.json``; returns the digests."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    lines, files = [], {}
    for pair in pairs:
        image = Path("images") / f"{pair.name}{pair.image.suffix.lower()}"
        mask = Path("masks") / f"{pair.name}{pair.mask.suffix.lower()}"
        link_or_copy(pair.image, out / image)
        link_or_copy(pair.mask, out / mask)
        lines.append(json.dumps({"source": str(mask), "target": str(image), "prompt": pair.prompt}))
        files[pair.name] = [digest_file(pair.image), digest_file(pair.mask)]
    write_text_atomic(out / PROMPT_FILE, "\n".join(lines) + "\n")
    return files


def write_split_dataset(data: str | Path, out: str | Path, *, test_fraction: float = 0.2, seed: int = 0,
                        group_regex: str | None = None, force: bool = False) -> dict:
    """Split the dataset ``data`` into ``out/train`` and ``out/test``; returns what ``splits.json`` holds.

    An ``out`` that already holds this very split (same data, same settings) is kept as it is; one holding anything
    else is refused unless ``force`` (then replaced whole: the new split is complete before the old one goes).
    """
    data, out = Path(data), Path(out)
    if data.resolve() == out.resolve() or data.resolve().is_relative_to(out.resolve()):
        raise ValueError(f"--out {out} holds the dataset {data}: the split goes to a new folder, the data stays put")
    pairs = real_pairs(data)
    split = make_split(pairs, test_fraction=test_fraction, seed=seed, group_regex=group_regex)
    settings = {"data": os.path.abspath(data), "test_fraction": test_fraction, "seed": seed,
                "group_regex": group_regex}
    if out.exists() and any(out.iterdir()):
        if is_split_dataset(out):
            saved = json.loads((out / SPLITS_FILE).read_text(encoding="utf-8"))
            same = {k: saved.get(k) for k in settings} == settings and all(saved.get(s) == split[s] for s in SIDES)
            if same:
                read_split_dataset(out)  # still what the split wrote
                return saved
        if not force:
            raise FileExistsError(f"{out} is not empty and holds no split of {data} with these settings; use another "
                                  "--out or pass --force to replace it")
    by_name = {p.name: p for p in pairs}
    with replace_dir(out) as tmp:
        files = {side: _write_side(tmp / side, [by_name[n] for n in split[side]]) for side in SIDES}
        record = {**split, **settings, "files": files}
        write_json_atomic(tmp / SPLITS_FILE, record, indent=1)
    return record
