"""Writing sampled image-mask pairs: atomic files, a shared JSONL manifest, resume, and an overview grid.

Output layout (the one ``tutorial_inference.py`` promises): ``OUT/images/NAME_kK.png`` (RGB), ``OUT/masks/NAME_kK.png``
(single channel, exactly 0/255: the label) and ``OUT/manifest.jsonl``, one JSON line per pair. When the labels are
eroded (MedDiff-FT's "corrosion"), the mask each image was conditioned on is kept too, in
``OUT/conditioning_masks/NAME_kK.png``, named by the line's ``conditioning_mask``: mask fidelity is measured against
it, not against the eroded label. Each file is written under a
temporary name and renamed, image first, then mask, then the manifest line; a pair counts as complete only when all
three exist, so a crash at any point leaves at most files that a re-run regenerates, never a half pair in the
manifest. Several processes (``--shard i/n``) share one OUT: every manifest line goes out as a single ``os.write`` on
an ``O_APPEND`` descriptor under an exclusive ``flock`` after reading what the others appended, so lines never
interleave and no pair gets two lines. A resumed run refuses an OUT whose
manifest was written with other settings (checkpoint, config, seed, steps, …) instead of mixing the two. A line
names the mask it was generated from (``source``) and any kept background by a path relative to OUT and by digest
(``source_digest``, ``background_digest``); ``OUT/provenance.json`` records the models and data behind the pairs
(``siamese.data.provenance``), for the evaluation's leak check.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from siamese.data.images import resize_image, write_png
from siamese.data.masks import erode_mask, mask_erodes, mask_to_png, resize_mask
from siamese.data.provenance import PROVENANCE_FILE, Provenance, digest_file, read_provenance

try:  # POSIX; elsewhere lines are still appended with one write each, without the advisory lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = ["CONDITIONING_DIR", "GRID_NAME", "IMAGES_DIR", "MANIFEST_NAME", "MASKS_DIR", "MaskSource", "PairWriter",
           "SampledPair", "WorkItem", "complete_records", "conditioning_mask_path", "copy_pair_files",
           "copy_provenance", "link_or_copy", "pair_files", "read_manifest", "rebased_record", "write_grid"]

logger = logging.getLogger(__name__)

IMAGES_DIR, MASKS_DIR, MANIFEST_NAME, GRID_NAME = "images", "masks", "manifest.jsonl", "grid.png"
CONDITIONING_DIR = "conditioning_masks"  # the masks eroded pairs were generated from (``conditioning_mask``)
# Per-item keys of a manifest line that a resumed run must reproduce exactly (run-wide keys are compared too).
ITEM_KEYS = ("source_name", "k", "seed", "prompt")


@dataclass(frozen=True)
class MaskSource:
    """A conditioning mask: output names derive from ``name`` (the file stem)."""

    name: str
    path: Path
    prompt: str


@dataclass(frozen=True)
class WorkItem:
    """Pair ``k`` of a mask, with its own seed (noise and, in random mode, the mask augmentation)."""

    source: MaskSource
    k: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.source.name}_k{self.k}"


@dataclass(frozen=True)
class SampledPair:
    """A generated pair: RGB image (H×W×3 uint8) and its mask at the image's size and at the source's size."""

    item: WorkItem
    image: np.ndarray
    mask01: np.ndarray
    source_mask01: np.ndarray
    background: Path | None = None  # the background image kept outside the mask (``backgrounds``), if any


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` as a hard link to ``src`` (no extra disk), else a copy (another file system, no link support)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def pair_files(record: Mapping[str, Any]) -> list[str]:
    """The files of a pair, relative to its folder: image, mask (the label) and, for eroded pairs, the mask it was
    conditioned on."""
    extra = [record["conditioning_mask"]] if record.get("conditioning_mask") else []
    return [record["image"], record["mask"], *extra]


def copy_pair_files(record: Mapping[str, Any], src: Path, dst: Path) -> None:
    """Every file of a pair of ``src`` hard-linked (else copied) into ``dst`` at the same relative path."""
    for rel in pair_files(record):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(src / rel, dst / rel)


def conditioning_mask_path(record: Mapping[str, Any], folder: str | Path) -> Path:
    """The mask a pair's image was generated from: ``conditioning_mask`` when its label was eroded, else the label
    itself. An eroded pair without one (made before it was recorded) is refused: its label is not what the image was
    conditioned on, and scoring against it would measure the erosion, not the generator."""
    folder = Path(folder)
    if record.get("conditioning_mask"):
        return folder / record["conditioning_mask"]
    if int(record.get("erode", 0) or 0) > 0:
        raise ValueError(f"{folder / MANIFEST_NAME}: pair {record.get('name')} has a mask eroded by {record['erode']} "
                         "px and no conditioning_mask (written before it was recorded); erode or sample it again")
    return folder / record["mask"]


def rebased_record(record: Mapping[str, Any], src: str | Path, out: str | Path) -> dict[str, Any]:
    """A manifest line of the pairs folder ``src`` as a line of ``out`` (a folder derived from it): ``source`` and
    ``background``, relative to the folder whose manifest names them, made relative to ``out``. Absolute paths (old
    manifests) and relative ones that resolve nowhere and carry no digest are kept as they are."""
    line = dict(record)
    for key in ("source", "background"):
        value = line.get(key)
        if not value or Path(value).is_absolute():
            continue
        path = Path(src) / value
        if f"{key}_digest" in line or path.exists():
            line[key] = os.path.relpath(path.resolve(), Path(out).resolve())
    return line


def copy_provenance(src: str | Path, dst: str | Path) -> bool:
    """``src/provenance.json`` copied into ``dst`` (a folder derived from the pairs of ``src``: what made them still
    made these); False when ``src`` has none."""
    source = Path(src) / PROVENANCE_FILE
    if not source.is_file():
        return False
    shutil.copyfile(source, Path(dst) / PROVENANCE_FILE)
    return True


def _parse_lines(data: bytes, where: Path, records: dict[str, dict[str, Any]]) -> None:
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[str(record["name"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            logger.warning("%s: ignoring a line that is not a manifest record: %.80s", where, line)


def read_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """The manifest's records by pair name (the last line wins); unparseable lines are skipped with a warning."""
    records: dict[str, dict[str, Any]] = {}
    if Path(path).is_file():
        _parse_lines(Path(path).read_bytes(), Path(path), records)
    return records


def complete_records(src: Path) -> dict[str, dict[str, Any]]:
    """The manifest records of a pairs folder, refusing (one line) a folder with none or with a pair whose image or
    mask file is missing: what a tool that derives a new folder from ``src`` checks before any work."""
    src = Path(src)
    records = read_manifest(src / MANIFEST_NAME)
    if not records:
        raise FileNotFoundError(f"{src / MANIFEST_NAME}: no manifest records (not a tutorial_inference.py output?)")
    for name, record in records.items():
        if not (src / record["image"]).is_file() or not (src / record["mask"]).is_file():
            raise FileNotFoundError(f"{src}: pair {name} is incomplete ({record['image']} / {record['mask']} missing)")
    return records


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


# Settings added to the run info after manifests were first written: a manifest line without one was made with
# its value here (DDIM before the solvers existed), so resuming such an OUT with the defaults is not refused.
RUN_INFO_DEFAULTS = {"sampler": "ddim", "cfg_mask": None, "erode": 0, "erode_kernel": "ellipse", "backgrounds": None,
                    "region": "max-pool", "background_start": "noise"}


class PairWriter:
    """Writes pairs into ``out_dir`` and knows which are complete. ``run_info`` (JSON-able settings shared by every
    pair: steps, cfg, checkpoint hash, …) goes into each manifest line and must match an existing manifest's;
    ``info`` goes into each line without being compared."""

    def __init__(self, out_dir: str | Path, run_info: Mapping[str, Any], *, keep_size: bool = False,
                 info: Mapping[str, Any] | None = None, provenance: Provenance | None = None) -> None:
        self.out = Path(out_dir)
        self.provenance = provenance  # what made these pairs: OUT/provenance.json, written with the first pair
        # Mask erosion (MedDiff-FT's "corrosion", siamese.data.masks.erode_mask) of the saved masks, in saved pixels.
        self.erode, self.erode_kernel = int(run_info.get("erode", 0)), str(run_info.get("erode_kernel", "ellipse"))
        erode_mask(np.zeros((1, 1), np.uint8), self.erode, self.erode_kernel)  # refuse bad settings up front
        # Through JSON once, so values compare equal to what a manifest line reads back (tuples become lists).
        self.run_info = json.loads(json.dumps({**run_info, "keep_size": bool(keep_size)}))
        self.info = dict(info or {})  # written into each line but not compared on resume (e.g. the batch size)
        self.keep_size = keep_size
        for sub in (IMAGES_DIR, MASKS_DIR):
            (self.out / sub).mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.out / MANIFEST_NAME
        self.recorded: dict[str, dict[str, Any]] = {}  # by name; grows with lines appended by any process
        self._offset = 0  # bytes of the manifest already parsed into `recorded`
        if self.manifest_path.is_file():
            data = self.manifest_path.read_bytes()
            _parse_lines(data, self.manifest_path, self.recorded)
            self._offset = len(data)

    def paths(self, name: str) -> tuple[Path, Path]:
        return self.out / IMAGES_DIR / f"{name}.png", self.out / MASKS_DIR / f"{name}.png"

    def relative(self, path: Path) -> str:
        """``path`` relative to OUT (how a manifest names the files outside it: resolved against its folder)."""
        return os.path.relpath(Path(path).resolve(), self.out.resolve())

    def record(self, item: WorkItem) -> dict[str, Any]:
        image, mask = self.paths(item.name)
        return {"name": item.name, "image": str(image.relative_to(self.out)), "mask": str(mask.relative_to(self.out)),
                "source": self.relative(item.source.path), "source_digest": digest_file(item.source.path),
                "source_name": item.source.name, "prompt": item.source.prompt,
                "k": item.k, "seed": item.seed, **self.run_info, **self.info}

    def check_compatible(self, items: Sequence[WorkItem]) -> None:
        """Refuse (one line) an OUT whose manifest holds pairs made with other settings than this run's."""
        expected = {item.name: self.record(item) for item in items}
        for name, old in self.recorded.items():
            keys = list(self.run_info) + (list(ITEM_KEYS) if name in expected else [])
            if name in expected and "source_digest" in old:  # lines written before digests were recorded lack it
                keys.append("source_digest")
            new = expected.get(name, self.run_info)
            for key in keys:
                if not _same(old.get(key, RUN_INFO_DEFAULTS.get(key)), new.get(key)):
                    raise ValueError(f"{self.manifest_path}: pair {name} was made with {key}={old.get(key)!r}, this "
                                     f"run has {key}={new.get(key)!r}; use another --out (or the same settings)")
        found = read_provenance(self.out) if (self.out / PROVENANCE_FILE).is_file() else None
        if self.provenance is not None and found is not None and found != self.provenance:
            raise ValueError(f"{self.out / PROVENANCE_FILE}: these pairs were made from other models or data than "
                             "this run's (the provenance differs); use another --out")

    def conditioning_path(self, name: str) -> Path:
        return self.out / CONDITIONING_DIR / f"{name}.png"

    def is_complete(self, name: str) -> bool:
        """Image, mask(s) and manifest line all present (as far as this writer has read the manifest)."""
        image, mask = self.paths(name)
        done = name in self.recorded and image.is_file() and mask.is_file()
        return done and (not self.erode or self.conditioning_path(name).is_file())

    def write(self, pair: SampledPair) -> dict[str, Any]:
        """Image, then mask, then (unless already recorded) the manifest line. Returns the record."""
        image_path, mask_path = self.paths(pair.item.name)
        image, mask01 = pair.image, pair.mask01
        record = self.record(pair.item)
        if self.keep_size:
            record["sampled_size"] = list(image.shape[:2])  # the size generated at (the latent region's grid)
            height, width = pair.source_mask01.shape
            image = resize_image(image, (height, width))
            mask01 = resize_mask(pair.source_mask01, (height, width))
        if pair.background is not None:
            record["background"] = self.relative(pair.background)
            record["background_digest"] = digest_file(pair.background)
        if self.provenance is not None and not (self.out / PROVENANCE_FILE).is_file():
            self.provenance.write(self.out)
        if self.erode:
            record["mask_eroded"] = mask_erodes(mask01, self.erode, self.erode_kernel)  # False: kept, else empty
            conditioning = self.conditioning_path(pair.item.name)
            conditioning.parent.mkdir(exist_ok=True)
            write_png(conditioning, mask_to_png(mask01))
            record["conditioning_mask"] = str(conditioning.relative_to(self.out))
            mask01 = erode_mask(mask01, self.erode, self.erode_kernel)
        write_png(image_path, image)
        write_png(mask_path, mask_to_png(mask01))
        self._append(record)
        return record

    def _append(self, record: dict[str, Any]) -> None:
        """Append the record's line unless its pair is already recorded (by this or another process).

        Under an exclusive ``flock``: parse what other processes appended since the last look, then one ``os.write``
        on an ``O_APPEND`` descriptor, so lines never interleave and a pair never gets two lines.
        """
        fd = os.open(self.manifest_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            end = os.fstat(fd).st_size
            if end > self._offset:
                _parse_lines(os.pread(fd, end - self._offset, self._offset), self.manifest_path, self.recorded)
            if record["name"] in self.recorded:
                self._offset = end
                return
            data = (json.dumps(record) + "\n").encode("utf-8")
            if end and os.pread(fd, 1, end - 1) != b"\n":
                data = b"\n" + data  # a torn last line (foreign writer, full disk): do not glue ours onto it
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(f"{self.manifest_path}: short write ({written} of {len(data)} bytes)")
            self._offset = end + written
            self.recorded[record["name"]] = record
        finally:
            os.close(fd)  # closing releases the lock


def write_grid(out_dir: str | Path, names: Sequence[str], cell: int = 128, per_row: int = 4) -> Path | None:
    """``OUT/grid.png``: the given pairs that exist on disk as (mask | image) tiles, ``per_row`` pairs a row."""
    out = Path(out_dir)
    tiles = []
    for name in names:
        image = cv2.imread(str(out / IMAGES_DIR / f"{name}.png"), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(out / MASKS_DIR / f"{name}.png"), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            continue
        mask = cv2.resize(mask, (cell, cell), interpolation=cv2.INTER_NEAREST)
        image = cv2.resize(image, (cell, cell), interpolation=cv2.INTER_AREA)
        tiles.append(np.concatenate([cv2.cvtColor(mask, cv2.COLOR_GRAY2BGR), image], axis=1))
    if not tiles:
        return None
    per_row = max(1, min(per_row, len(tiles)))
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % per_row)
    rows = [np.concatenate(tiles[i:i + per_row], axis=1) for i in range(0, len(tiles), per_row)]
    path = out / GRID_NAME
    write_png(path, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_BGR2RGB))
    return path
