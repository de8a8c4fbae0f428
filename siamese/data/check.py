"""Check a whole training dataset before a long run: every JSONL line, every file, every pixel, in one pass.

Training reads a pair only when a worker reaches it, so a broken line, an undecodable file or a mask that
binarises to nothing shows up hours into a multi-GPU run (or never: an empty mask trains silently). This module
reads everything once, one file at a time, and returns *findings*: one per kind of problem (severity ``error``,
``warning`` or ``info``, a code, a count and a few example files). Errors make training fail or the data useless;
warnings are probably unintended; infos say how the loader will treat the data. The reading rules are the training
loader's own (``siamese.data.images``, ``siamese.data.masks``), so what is reported is what training will see.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from siamese.data.findings import SEVERITIES, WHAT, Finding, Findings, format_findings
from siamese.data.images import Intensity, aspect_ratios_differ, decode_image, image_to_rgb8, parse_intensity
from siamese.data.layout import PROMPT_FILE, parse_prompt_line, resolve_record_path
from siamese.data.masks import DEFAULT_THRESHOLD, is_label_mask, mask_to_gray, resolve_threshold

__all__ = ["SEVERITIES", "Finding", "check_dataset", "describe_mask", "format_findings"]

DEFAULT_RESOLUTION = 384  # the paper's training resolution (data.resolution's default)
NEAR_BLACK = 32  # an image whose brightest pixel reads below this 8-bit level is near-black as training sees it

# ---------------------------------------------------------------------------------------------------- masks


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:
        return mask_to_gray(array) if array.ndim == 2 else _levels8(array)
    return array.astype(np.uint8) if array.dtype == np.bool_ else array


def _levels8(array: np.ndarray) -> np.ndarray:
    """16-bit colour masks at 8 bit by the rule of ``mask_to_gray`` (÷ 257 only when the 16-bit range is used)."""
    return array.astype(np.uint8) if int(array.max(initial=0)) <= 255 else (array // 257).astype(np.uint8)


def _interior(values: np.ndarray) -> np.ndarray:
    """Pixels equal to their 4 neighbours (the image border excluded): the inside of a region of one value.

    Interpolated edges and JPEG ringing seldom form such pixels, class regions are mostly made of them.
    """
    centre = values[1:-1, 1:-1]
    inside = (centre == values[:-2, 1:-1]) & (centre == values[2:, 1:-1])
    inside &= (centre == values[1:-1, :-2]) & (centre == values[1:-1, 2:])
    return np.pad(inside, 1)


def _groups(values: np.ndarray, colour: bool, tolerance: int = 16) -> int:
    """Number of groups of values (gray levels or packed RGB) whose channels differ by more than ``tolerance``."""
    channels = np.stack([(values >> 16) & 255, (values >> 8) & 255, values & 255], axis=1) if colour \
        else values[:, None]
    groups: list[np.ndarray] = []
    for value in channels.astype(np.int64):
        if not any(np.abs(value - g).max() <= tolerance for g in groups):
            groups.append(value)
    return len(groups)


def _histogram(values: np.ndarray, counts: np.ndarray, colour: bool, top: int = 4) -> str:
    shares = counts / counts.sum()
    order = np.argsort(-counts, kind="stable")[:top]
    if colour:
        shown = ", ".join(f"#{int(values[i]):06x}: {100 * shares[i]:.1f}%" for i in order)
        head, unit = "colours", "colours"
    else:
        shown = ", ".join(f"{int(values[i])}: {100 * shares[i]:.1f}%" for i in order)
        head, unit = "gray", "levels"
    more = f" (+{len(values) - top} more {unit})" if len(values) > top else ""
    return f"{head} {shown}{more}"


def describe_mask(array: np.ndarray) -> tuple[str, str]:
    """Classify a decoded mask (OpenCV channel order, 8 or 16 bit) and summarise its values.

    Returns ``(kind, histogram)``. kind: ``constant`` (one value), ``label`` (gray values {0, 1} or {0, k ≤ 127}),
    ``binary`` (two gray levels), ``colour`` (two colours), ``multiclass`` (3+ classes: gray levels or colours that
    form regions, telling palette / class-index masks from edges), ``nonbinary`` (more values, but not 3 regions:
    soft or interpolated edges, JPEG noise). histogram: the most frequent values with their pixel shares.
    """
    array = _to_uint8(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    colour = False
    if array.ndim == 3 and array.shape[2] >= 3:
        b, g, r = array[:, :, 0], array[:, :, 1], array[:, :, 2]
        if np.array_equal(b, g) and np.array_equal(g, r):
            array = b
        else:
            colour = True
            array = (r.astype(np.uint32) << 16) | (g.astype(np.uint32) << 8) | b.astype(np.uint32)
    if colour:
        values, counts = np.unique(array.ravel(), return_counts=True)
    else:
        hist = np.bincount(array.ravel(), minlength=256)
        values = np.flatnonzero(hist)
        counts = hist[values]
    text = _histogram(values, counts, colour)
    if len(values) == 1:
        return "constant", text
    if not colour and (int(values.max()) == 1 or (len(values) == 2 and is_label_mask(array))):
        return "label", text  # 0/1, or 0/k with k ≤ 127: class values, read as foreground = k
    if len(values) == 2:
        return ("colour" if colour else "binary"), text
    inside_values, inside_counts = np.unique(array[_interior(array)], return_counts=True)
    regions = inside_values[inside_counts >= max(16, array.size // 2000)]
    # Small gray values (≤ 31) are class indices, each its own class; otherwise nearby values are one class
    # (lossy compression shifts a flat region by a few levels).
    exact = not colour and int(values.max()) <= 31
    classes = len(regions) if exact else _groups(regions, colour)
    return ("multiclass" if classes >= 3 else "nonbinary"), text


# ---------------------------------------------------------------------------------------------------- records


@dataclass
class _Record:
    lineno: int
    source: Path
    target: Path


def _read_bytes(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8)


def _parse(prompt_file: Path, found: Findings) -> list[_Record]:
    """All well-formed lines whose files exist; every bad line and missing file becomes a finding."""
    base = prompt_file.resolve().parent
    records: list[_Record] = []
    bad: list[int] = []
    with prompt_file.open("rb") as handle:
        for lineno, raw_line in enumerate(handle, start=1):
            try:
                text = raw_line.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                bad.append(lineno)
                found.add("error", "bad_line", f"line {lineno}: not UTF-8 text ({error.reason})")
                continue
            if not text:
                continue
            try:
                item = parse_prompt_line(text, require_target=True)
            except ValueError as error:
                bad.append(lineno)
                found.add("error", "bad_line", f"line {lineno}: {error}")
                continue
            paths = {}
            for key in ("source", "target"):
                try:
                    paths[key] = resolve_record_path(item[key], key, base, f"line {lineno}")
                except FileNotFoundError:
                    found.add("error", "missing_file", f"line {lineno}: {item[key]}")
            if len(paths) == 2:
                records.append(_Record(lineno, paths["source"], paths["target"]))
    if bad:
        finding = found.get("bad_line")
        assert finding is not None
        shown = ", ".join(map(str, bad[:20])) + (", …" if len(bad) > 20 else "")
        finding.what = f"{WHAT['bad_line']} (line{'s' if len(bad) > 1 else ''} {shown})"
    return records


def _shown_path(path: Path, base: Path) -> str:
    try:
        return path.relative_to(base).as_posix()
    except ValueError:
        return str(path)


def _label_what(threshold: int | None) -> tuple[str, str]:
    if threshold is None:
        return "warning", (f"{WHAT['label_mask']}: read correctly as foreground = value 1 by data.mask_threshold: "
                           f"null (automatic: any non-zero label; other masks: gray > {DEFAULT_THRESHOLD}); an "
                           f"explicit threshold ≥ 1 would make 0/1 labels empty")
    if threshold == 0:
        return "warning", f"{WHAT['label_mask']}: read as foreground = value 1 by data.mask_threshold=0"
    return "error", (f"{WHAT['label_mask']}: data.mask_threshold={threshold} reads them as EMPTY; set "
                     f"data.mask_threshold: null (automatic) or 0")


def check_dataset(root: str | Path, *, resolution: int = DEFAULT_RESOLUTION, threshold: int | None = None,
                  progress: bool | None = None, intensity: Intensity | str | None = None) -> list[Finding]:
    """Check ``root/prompt.json`` (or the JSONL file ``root``) and every file it names; findings, errors first.

    ``resolution`` is ``data.resolution``, ``threshold`` is ``data.mask_threshold`` (None: automatic) and
    ``intensity`` is ``data.intensity`` (None: auto), so sizes, masks and intensities are judged as training will
    read them. Files are read one at a time (memory stays bounded); only a
    digest per image is kept, for duplicates. ``progress``: a tqdm bar (None: only on a terminal). Raises
    FileNotFoundError when there is no prompt file.
    """
    root = Path(root)
    prompt_file = root if root.is_file() else root / PROMPT_FILE
    if not prompt_file.is_file():
        raise FileNotFoundError(f"no {PROMPT_FILE} in {root} (make one with: python -m tools.prepare_data --images "
                                f"DIR --masks DIR --out {root})")
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if threshold is not None and not 0 <= threshold <= 254:
        raise ValueError(f"mask threshold {threshold} must lie in 0..254 or be None (automatic)")
    intensity = parse_intensity(intensity)
    base = prompt_file.resolve().parent
    found = Findings()
    records = _parse(prompt_file, found)
    if not records and found.get("bad_line") is None and found.get("missing_file") is None:
        found.add("error", "no_records", f"{prompt_file} (expected JSONL lines with source/target/prompt)")

    image_uses: dict[Path, list[int]] = defaultdict(list)  # resolved file → lines, for duplicate paths
    mask_uses: dict[Path, list[int]] = defaultdict(list)
    digests: dict[str, list[Path]] = defaultdict(list)  # image sha256 → distinct resolved paths
    masks_checked = masks_empty = 0
    disable = None if progress is None else not progress  # tqdm: None = only on a terminal
    for record in tqdm(records, desc="checking pairs", unit="pair", disable=disable):
        line = f"line {record.lineno}: "
        image_path = record.target.resolve()
        repeated = image_path in image_uses
        image_uses[image_path].append(record.lineno)
        mask_uses[record.source.resolve()].append(record.lineno)
        image_hw = _check_image(record.target, image_path, line + _shown_path(record.target, base), resolution,
                                found, None if repeated else digests, intensity)
        mask_result = _check_mask(record.source, line + _shown_path(record.source, base), threshold, found)
        if mask_result is not None:
            masks_checked += 1
            masks_empty += mask_result[1]
        if image_hw is None or mask_result is None:
            continue
        mask_hw = mask_result[0]
        sizes = f"{line}image {image_hw[0]}×{image_hw[1]}, mask {mask_hw[0]}×{mask_hw[1]}"
        if aspect_ratios_differ(image_hw, mask_hw):
            found.add("error", "aspect_mismatch", sizes)
        elif image_hw != mask_hw:
            found.add("info", "size_mismatch", sizes)
        found.add("info", "checked")

    for kind, uses in (("image", image_uses), ("mask", mask_uses)):
        for path, lines in uses.items():
            if len(lines) > 1:
                shown_lines = ", ".join(map(str, lines[:6])) + (", …" if len(lines) > 6 else "")
                found.add("warning", "duplicate_path", f"{kind} {_shown_path(path, base)} (lines {shown_lines})",
                          count=len(lines) - 1)
    for paths in digests.values():
        if len(paths) > 1:
            found.add("warning", "duplicate_image", " = ".join(_shown_path(p, base) for p in paths[:3]),
                      count=len(paths) - 1)
    empty = found.get("empty_mask")
    if empty is not None and masks_empty == masks_checked:
        empty.severity = "error"
        empty.what = f"every mask is all background after binarisation: nothing to learn ({empty.what})"
    label = found.get("label_mask")
    if label is not None:
        label.severity, label.what = _label_what(threshold)
    small = found.get("small_image")
    if small is not None:
        small.what = WHAT["small_image"].replace("resolution", f"resolution {resolution}")
    return found.sorted()


def _check_image(path: Path, resolved: Path, shown: str, resolution: int, found: Findings,
                 digests: dict[str, list[Path]] | None, intensity: Intensity) -> tuple[int, int] | None:
    """Decode one image as training does; returns (height, width) or None when it cannot be read."""
    try:
        raw = _read_bytes(path)
        array = decode_image(raw, path)
        rgb = image_to_rgb8(array, path, intensity)  # the loader's conversion: rejects unsupported depths / channels
    except (OSError, ValueError) as error:
        found.add("error", "unreadable_file", f"{shown} ({_short(error)})")
        return None
    if digests is not None:
        digests[hashlib.sha256(raw.tobytes()).hexdigest()].append(resolved)
    del raw
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels == 1:
        found.add("info", "gray_image", shown)
    elif channels == 4:
        found.add("info", "alpha_image", shown)
    top, top8 = float(array.max()), int(rgb.max())
    if array.dtype != np.uint8:
        found.add("info", "image_16bit", f"{shown} ({array.dtype}, max {top:g} → {top8} by data.intensity {intensity})")
    if top > 0 and top8 < NEAR_BLACK:
        fix = "percentile" if intensity.mode != "percentile" else "minmax"
        found.add("warning", "near_black_image", f"{shown} (max {top:g} → {top8} of 255 by data.intensity "
                                                 f"{intensity}; data.intensity: {fix} stretches it)")
    if height < resolution or width < resolution:
        found.add("warning", "small_image", f"{shown} ({height}×{width})")
    if height != width:
        found.add("info", "non_square", f"{shown} ({height}×{width})")
    return height, width


def _check_mask(path: Path, shown: str, threshold: int | None,
                found: Findings) -> tuple[tuple[int, int], bool] | None:
    """Decode and classify one mask; returns ((height, width), empty after binarisation) or None if unreadable."""
    try:
        raw = _read_bytes(path)
        array = decode_image(raw, path)
        gray = mask_to_gray(array)
    except (OSError, ValueError) as error:
        found.add("error", "unreadable_file", f"{shown} ({_short(error)})")
        return None
    kind, histogram = describe_mask(array)
    level = resolve_threshold(gray, threshold)
    foreground = float((gray > level).mean())
    if kind == "label":
        found.add("warning", "label_mask", shown)
    elif kind in ("multiclass", "nonbinary"):
        found.add("warning", f"{kind}_mask", f"{shown} ({histogram}; foreground {100 * foreground:.1f}%)")
    elif kind == "colour":
        found.add("info", "colour_mask", f"{shown} ({histogram}; foreground {100 * foreground:.1f}%)")
    empty = foreground == 0.0
    if empty:
        hint = f"; max gray {int(gray.max())} ≤ threshold {level}" if gray.any() else ""
        found.add("warning", "empty_mask", f"{shown} ({histogram}{hint})")
    elif foreground == 1.0:
        found.add("warning", "full_mask", f"{shown} ({histogram})")
    return gray.shape, empty


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "…"
