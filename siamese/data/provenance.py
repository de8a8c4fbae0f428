"""What every model file and pairs folder was made from: provenance records, carried from parent to child.

A **record** says that a model was *trained* on a set of files (``role="trained"``), that an output *contains* a
set of files (``role="content"``: backgrounds repaired from these images), or that a parent is an *external* file
whose data the framework cannot know (``role="external"``: an SD1.5 checkpoint, a file written elsewhere). Files are
named by a 16-hex-digit prefix of their sha256, so a record survives moved folders and cannot be fooled by renames.

A **provenance** is the set of records of everything upstream of a file: a merged checkpoint carries its base's
records and its training run's, a pairs folder its checkpoint's, its mask generator's and its background library's.
It travels in a checkpoint's safetensors metadata (``siamese.provenance``, compact JSON) and, for folders (runs,
pairs, masks, backgrounds), in ``provenance.json``. ``siamese.evaluation.leaks`` walks it to refuse a synthetic
pair whose generator saw a test image.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ldm.fileio import write_json_atomic

__all__ = ["METADATA_PROVENANCE", "PROVENANCE_FILE", "ROLES", "Provenance", "Record", "dataset_record",
           "digest_file", "external", "read_provenance"]

METADATA_PROVENANCE = "siamese.provenance"
PROVENANCE_FILE = "provenance.json"
ROLES = ("trained", "content", "external")
DIGEST_CHARS = 16  # 64 bits of sha256: collisions among a dataset's files are out of reach

_digests: dict[tuple[str, int, int], str] = {}


def digest_file(path: str | Path) -> str:
    """The first 16 hex digits of the file's sha256 (cached per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                sha.update(chunk)
        _digests[key] = sha.hexdigest()[:DIGEST_CHARS]
    return _digests[key]


@dataclass(frozen=True)
class Record:
    """One step upstream: ``what`` (a human-readable name: ``"Siamese-Diffusion run runs/polyps"``), its ``role``,
    where the files were (``root``, for messages only) and their digests."""

    role: str
    what: str
    root: str = ""
    images: tuple[str, ...] = ()
    masks: tuple[str, ...] = ()
    note: str = ""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"provenance record role {self.role!r}: expected one of {', '.join(ROLES)}")

    @property
    def id(self) -> str:
        text = json.dumps([self.role, self.what, self.root, self.images, self.masks, self.note])
        return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_CHARS]

    def to_json(self) -> dict:
        out: dict = {"role": self.role, "what": self.what}
        for key in ("root", "note"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        for key in ("images", "masks"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        return out

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> Record:
        try:
            return cls(role=str(data["role"]), what=str(data["what"]), root=str(data.get("root", "")),
                       images=tuple(str(d) for d in data.get("images", ())),
                       masks=tuple(str(d) for d in data.get("masks", ())), note=str(data.get("note", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: a provenance record is malformed ({exc}): {dict(data)!r:.200}") from None


@dataclass(frozen=True)
class Provenance:
    """The records of everything upstream of one file, without repeats, in the order they were added."""

    records: tuple[Record, ...] = field(default_factory=tuple)

    def merge(self, *others: Provenance | Record | None) -> Provenance:
        seen = {r.id for r in self.records}
        out = list(self.records)
        for other in others:
            items = (other,) if isinstance(other, Record) else (other.records if other is not None else ())
            for record in items:
                if record.id not in seen:
                    seen.add(record.id)
                    out.append(record)
        return Provenance(tuple(out))

    def trained(self) -> list[Record]:
        return [r for r in self.records if r.role == "trained"]

    def external(self) -> list[Record]:
        return [r for r in self.records if r.role == "external"]

    def to_json(self) -> dict:
        return {"records": [r.to_json() for r in self.records]}

    @classmethod
    def from_json(cls, data: object, where: str) -> Provenance:
        if not isinstance(data, Mapping) or not isinstance(data.get("records"), list):
            raise ValueError(f"{where}: provenance must be a JSON object with a 'records' list")
        return cls(tuple(Record.from_json(r, where) for r in data["records"]))

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_PROVENANCE: json.dumps(self.to_json(), separators=(",", ":"))}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], where: str) -> Provenance | None:
        text = meta.get(METADATA_PROVENANCE)
        if not text:
            return None
        try:
            return cls.from_json(json.loads(text), f"{where} (metadata {METADATA_PROVENANCE})")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: metadata {METADATA_PROVENANCE} is not JSON ({exc})") from None

    def write(self, folder: str | Path) -> Path:
        """``folder/provenance.json`` (atomic; the folder is created if needed)."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(folder) / PROVENANCE_FILE
        write_json_atomic(path, self.to_json(), indent=1)
        return path


def read_provenance(folder: str | Path) -> Provenance | None:
    """``folder/provenance.json`` (or that file itself), or None when there is none."""
    path = Path(folder)
    path = path if path.name == PROVENANCE_FILE else path / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read provenance ({exc})") from None
    return Provenance.from_json(data, str(path))


def external(what: str, note: str = "") -> Record:
    """A parent whose training data the framework cannot know."""
    return Record("external", what, note=note)


def dataset_record(what: str, root: str | Path, images: Iterable[str | Path] = (), masks: Iterable[str | Path] = (),
                   role: str = "trained", note: str = "") -> Record:
    """A record of the files ``images`` and ``masks`` (digested now) under ``root``."""
    return Record(role, what, os.path.abspath(root), tuple(digest_file(p) for p in images),
                  tuple(digest_file(p) for p in masks), note)
