"""Mask-image pair datasets for Siamese-Diffusion training and sampling.

The on-disk layout is the one of ControlNet's tutorial and the released Siamese-Diffusion code: a root folder with a
JSONL ``prompt.json`` whose lines are ``{"source": mask, "target": image, "prompt": text}``. Samples follow the
released preprocessing: the mask is binarised at gray level 127 *before* a nearest-neighbour resize (so it stays
binary; 0/1 label masks are recognised in the automatic mode, see ``siamese.masks``), the image is resized to a
square ``resolution`` (aspect ratio is not preserved, as in the original) and scaled to [-1, 1]. Hints are
channels-first in [0, 1]: ``mask_hint`` = the mask replicated to 3 channels and ``image_hint`` = (image + 1) / 2,
the image-branch hint of the paper. Prompt dropout is a training-time choice and is left to the model. Images of
any common storage form load as 8-bit RGB: gray is replicated to three channels, 16-bit is scaled (value // 257,
never clipped), alpha is dropped. ``SyntheticLesionDataset`` draws procedural "tissue with a lesion" pairs so tiny
configs, tests and the demo run without any medical data on disk (none is redistributable or installable offline).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from siamese.masks import (
    AUTO_THRESHOLD,
    DEFAULT_THRESHOLD,
    binarize_mask,
    is_label_mask,
    mask_to_png,
    read_mask_gray,
    resize_mask,
)

__all__ = [
    "ImageDataset",
    "MaskImageDataset",
    "PairRecord",
    "SyntheticLesionDataset",
    "aspect_ratios_differ",
    "decode_image",
    "header_size",
    "image_to_rgb8",
    "make_sample",
    "parse_prompt_line",
    "read_image_rgb",
    "read_prompt_jsonl",
    "synthetic_pair",
    "write_synthetic_dataset",
]

logger = logging.getLogger(__name__)

PROMPT_FILE = "prompt.json"
DEFAULT_PROMPT = "A photo of a polyp."  # the prompt the authors used for every polyp image


@dataclass(frozen=True)
class PairRecord:
    """One line of ``prompt.json``: resolved mask path, image path (None when not required) and prompt."""

    source: Path
    target: Path | None
    prompt: str


def resolve_record_path(value: object, key: str, base: Path, where: str) -> Path:
    """The file a ``source``/``target`` value names: absolute, or relative to ``base`` (the JSONL's folder) and
    then to the working directory. Raises ValueError for a non-string value, FileNotFoundError for no file."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: key '{key}' must be a non-empty string path, got {value!r}")
    path = Path(value).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        # Relative to the JSONL's folder (ControlNet layout); the released Siamese code opened paths relative to the
        # working directory, so accept that as a fallback to run existing prompt.json files unchanged.
        candidates = [base / path, Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{where}: '{key}' file not found: {value} (looked in {', '.join(map(str, candidates))})")


def parse_prompt_line(text: str, *, require_target: bool = True) -> dict:
    """Parse and check one non-blank JSONL line; ValueError says what is wrong (without the location).

    Checks the JSON, that it is an object, the keys (source, prompt and, with ``require_target``, target), that
    the prompt is a string and that the paths are non-empty strings. Files are not looked up here.
    """
    try:
        item = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (expected one JSON object per line, not a JSON array)" if text.startswith("[") else ""
        raise ValueError(f"invalid JSON: {error.msg} at column {error.colno}{hint}") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object with source/target/prompt, got {type(item).__name__}")
    needed = ("source", "target", "prompt") if require_target else ("source", "prompt")
    missing = [key for key in needed if key not in item]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)} (expected {', '.join(needed)})")
    if not isinstance(item["prompt"], str):
        raise ValueError(f"key 'prompt' must be a string, got {item['prompt']!r}")
    for key in needed[:-1]:
        if not isinstance(item[key], str) or not item[key]:
            raise ValueError(f"key '{key}' must be a non-empty string path, got {item[key]!r}")
    return item


def read_prompt_jsonl(path: str | Path, *, require_target: bool = True) -> list[PairRecord]:
    """Parse a JSONL prompt file into records, checking that every referenced file exists.

    Relative paths are resolved against the file's folder first, then the current directory. Blank lines are
    skipped. Every problem raises one line naming the file and line number (``python -m tools.doctor`` lists all).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    base = path.resolve().parent
    records: list[PairRecord] = []
    with path.open("r", encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.strip()
            if not text:
                continue
            where = f"{path}:{lineno}"
            try:
                item = parse_prompt_line(text, require_target=require_target)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
            source = resolve_record_path(item["source"], "source", base, where)
            target = resolve_record_path(item["target"], "target", base, where) if require_target else None
            records.append(PairRecord(source=source, target=target, prompt=item["prompt"]))
    if not records:
        raise ValueError(f"{path}: no records (the file is empty; expected JSONL lines with source/target/prompt)")
    return records


def decode_image(raw: np.ndarray, path: str | Path) -> np.ndarray:
    """Decode an encoded image file's bytes at native depth and channel count (``cv2.IMREAD_UNCHANGED``).

    Unlike ``IMREAD_COLOR`` this does not apply EXIF orientation, like the mask reader: a pair stays aligned.
    """
    array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
    if array is None:
        raise ValueError(f"cannot decode image {path} (expected a PNG/JPEG/BMP/TIFF file)")
    return array


def image_to_rgb8(array: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
    """Convert a decoded image (OpenCV channel order) to uint8 RGB H×W×3, explicitly for every storage form.

    2-D gray (or H×W×1) → three identical channels; 3-channel BGR → RGB; 4-channel BGRA → RGB, alpha dropped;
    uint16 → uint8 by ``value // 257`` (65535 → 255; scaled, never clipped). Other depths raise ValueError.
    """
    if array.dtype == np.uint16:
        array = (array // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"image {path}: pixel type {array.dtype} is not supported (expected 8- or 16-bit integers)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        return cv2.cvtColor(array, cv2.COLOR_GRAY2RGB)
    if array.ndim == 3 and array.shape[2] == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    if array.ndim == 3 and array.shape[2] == 4:
        return cv2.cvtColor(array, cv2.COLOR_BGRA2RGB)
    raise ValueError(f"image {path}: shape {array.shape} is not supported (expected gray, BGR or BGRA)")


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 RGB H×W×3 (gray → 3 channels, 16-bit → value // 257, alpha dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return image_to_rgb8(decode_image(np.fromfile(path, dtype=np.uint8), path), path)


def header_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image file from its header only (PIL reads no pixel data until asked)."""
    with warnings.catch_warnings():
        # Large scans trip PIL's decompression-bomb warning; nothing is decoded here.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            width, height = image.size
    return height, width


def aspect_ratios_differ(image_hw: tuple[int, int], mask_hw: tuple[int, int]) -> bool:
    """True when an image and a mask cannot line up: their aspect ratios differ by more than 1 %."""
    (ih, iw), (mh, mw) = image_hw, mask_hw
    return abs(ih * mw - iw * mh) > 0.01 * ih * mw


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    if (height, width) == (size, size):
        return rgb
    # INTER_AREA averages when shrinking (no aliasing); cubic when any side grows.
    shrinking = height >= size and width >= size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    return cv2.resize(rgb, (size, size), interpolation=interpolation)


def _rgb_to_signed(rgb: np.ndarray) -> np.ndarray:
    # numpy, not torch, for the per-pixel arithmetic: small torch ops inside DataLoader workers pay a large
    # per-call threading overhead on few-core machines.
    return rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def make_sample(
    rgb: np.ndarray, mask01: np.ndarray, resolution: int, hint_resolution: int, prompt: str, name: str
) -> dict[str, torch.Tensor | str]:
    """Build the sample dict shared by all datasets from uint8 RGB and a {0, 1} mask at any size."""
    image = _rgb_to_signed(_resize_rgb(rgb, resolution))
    hint_source = image if hint_resolution == resolution else _rgb_to_signed(_resize_rgb(rgb, hint_resolution))
    image_hint = (hint_source + np.float32(1.0)) / np.float32(2.0)
    mask = resize_mask(mask01, hint_resolution).astype(np.float32)
    return {
        "image": torch.from_numpy(image),
        "mask_hint": torch.from_numpy(np.repeat(mask[None], 3, axis=0)),
        "image_hint": torch.from_numpy(image_hint),
        "prompt": prompt,
        "name": name,
    }


def _check_resolution(resolution: int, hint_resolution: int | None) -> tuple[int, int]:
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    hint = resolution if hint_resolution is None else hint_resolution
    if not isinstance(hint, int) or hint <= 0:
        raise ValueError(f"hint_resolution must be a positive int or None, got {hint_resolution!r}")
    return resolution, hint


MASK_RULE_PROBE = 32  # masks read when a dataset is built, to log which binarisation rule applies


class MaskImageDataset(Dataset):
    """Mask-image pairs listed in ``root/prompt.json`` (``root`` may also be the JSONL file itself).

    Items: ``image`` float32 3×R×R in [-1, 1] (RGB), ``mask_hint`` float32 3×h×h in {0, 1}, ``image_hint``
    float32 3×h×h in [0, 1], ``prompt`` (``prompt_override`` when given), ``name`` (the mask's file stem),
    with R = ``resolution`` and h = ``hint_resolution`` (defaults to R).

    ``threshold`` (``data.mask_threshold``): ``None`` (automatic) reads each mask whose values are all in {0, 1}
    as a label mask (foreground = 1) and any other at gray > 127; an integer T keeps gray > T for every mask.
    In the automatic mode a few masks are read at construction to log once which rule applies.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        hint_resolution: int | None = None,
        prompt_override: str | None = None,
        *,
        threshold: int | None = AUTO_THRESHOLD,
    ) -> None:
        self.resolution, self.hint_resolution = _check_resolution(resolution, hint_resolution)
        if threshold is not None and (isinstance(threshold, bool) or not 0 <= int(threshold) <= 254):
            raise ValueError(f"threshold {threshold!r} must lie in 0..254 (an 8-bit gray level) or be None (automatic)")
        root = Path(root)
        self.prompt_file = root if root.is_file() else root / PROMPT_FILE
        self.records = read_prompt_jsonl(self.prompt_file, require_target=True)
        self.prompt_override = prompt_override
        self.threshold = threshold
        if threshold is None:
            self._log_mask_rule()

    def _log_mask_rule(self) -> None:
        """Log once which rule the automatic mode applies, from up to MASK_RULE_PROBE masks spread over the list."""
        count = len(self.records)
        picks = sorted({i * count // MASK_RULE_PROBE for i in range(MASK_RULE_PROBE)}) if count > MASK_RULE_PROBE \
            else range(count)
        labels = read = 0
        for index in picks:
            try:
                gray = read_mask_gray(self.records[index].source)
            except (OSError, ValueError):
                continue  # reported with its record when the item is loaded
            read += 1
            labels += is_label_mask(gray)
        scope = f"{read} files" if read == count else f"{read} sampled files"
        if labels:
            logger.info("masks: 0/1 label images detected (%d of %s): foreground = value 1; other masks: gray > %d "
                        "(data.mask_threshold: auto)", labels, scope, DEFAULT_THRESHOLD)
        else:
            logger.info("masks: foreground = gray > %d (no 0/1 label images among %s; data.mask_threshold: auto)",
                        DEFAULT_THRESHOLD, scope)

    def __len__(self) -> int:
        return len(self.records)

    def read_mask(self, index: int) -> np.ndarray:
        """Record ``index``'s mask as uint8 {0, 1} at its file's size, by this dataset's threshold rule."""
        source = self.records[index].source
        gray = read_mask_gray(source)
        return binarize_mask(gray, self.threshold)

    def check_pairs(self) -> None:
        """Check every pair's image/mask aspect ratio from the file headers only (no pixel is decoded).

        Cheap enough to run before a long training run; raises one ValueError naming the first bad pair (or the
        first file whose header cannot be read) and how many pairs are bad.
        """
        bad: list[str] = []
        for index, record in enumerate(self.records):
            assert record.target is not None  # guaranteed by require_target=True
            try:
                image_hw, mask_hw = header_size(record.target), header_size(record.source)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                bad.append(f"record {index}: cannot read the image size of {record.target} or {record.source} "
                           f"({error})")
                continue
            if aspect_ratios_differ(image_hw, mask_hw):
                bad.append(f"record {index}: mask {record.source} is {mask_hw[0]}×{mask_hw[1]} but image "
                           f"{record.target} is {image_hw[0]}×{image_hw[1]} (aspect ratios differ)")
        if bad:
            raise ValueError(f"{self.prompt_file}: {len(bad)} of {len(self.records)} pairs cannot line up; first: "
                             f"{bad[0]} (python -m tools.doctor lists them all)")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        record = self.records[index]
        assert record.target is not None  # guaranteed by require_target=True
        rgb = read_image_rgb(record.target)
        mask01 = self.read_mask(index)
        # Different sizes are fine (both are resized), different aspect ratios mean the pair cannot line up.
        if aspect_ratios_differ(rgb.shape[:2], mask01.shape):
            (ih, iw), (mh, mw) = rgb.shape[:2], mask01.shape
            raise ValueError(
                f"{self.prompt_file} record {index}: mask {record.source} is {mh}×{mw} but image {record.target} "
                f"is {ih}×{iw} (aspect ratios differ)"
            )
        prompt = record.prompt if self.prompt_override is None else self.prompt_override
        return make_sample(rgb, mask01, self.resolution, self.hint_resolution, prompt, record.source.stem)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class ImageDataset(Dataset):
    """Unlabelled images with prompts, for base pretraining: items ``image`` (3×R×R in [-1, 1]), ``prompt``, ``name``.

    ``from_root`` takes a ``prompt.json`` layout (its ``target`` images and prompts; masks are not read) or a plain
    folder of images (searched recursively, hidden files skipped), every image with ``prompt``.
    """

    def __init__(self, paths: list[Path], prompts: list[str], resolution: int) -> None:
        if not paths:
            raise ValueError("ImageDataset: no images")
        self.paths, self.prompts = paths, prompts
        self.resolution, _ = _check_resolution(resolution, None)

    @classmethod
    def from_root(cls, root: str | Path, resolution: int, prompt: str, prompt_override: str | None = None
                  ) -> ImageDataset:
        root = Path(root)
        prompt_file = root if root.is_file() else root / PROMPT_FILE
        if prompt_file.is_file():
            records = read_prompt_jsonl(prompt_file, require_target=True)
            paths = [r.target for r in records if r.target is not None]
            prompts = [prompt_override or r.prompt for r in records]
            return cls(paths, prompts, resolution)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: no such folder or prompt file: {root}")
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not paths:
            raise ValueError(f"data.root {root}: no {PROMPT_FILE} and no images "
                             f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in it")
        return cls(paths, [prompt_override or prompt] * len(paths), resolution)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        rgb = _resize_rgb(read_image_rgb(self.paths[index]), self.resolution)
        return {"image": torch.from_numpy(_rgb_to_signed(rgb)), "prompt": self.prompts[index],
                "name": self.paths[index].stem}


# --------------------------------------------------------------------------------------------------------------
# Procedural data: smooth "tissue" with 1-2 irregular lesions, so the pipeline trains with nothing on disk.


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in roughly [-1, 1]: a cells×cells random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)


def _lesion_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """Union of 1-2 rotated, elongated blobs whose radius varies with a few angular harmonics."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres in (0, 1)
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        radius = rng.uniform(0.1, 0.22)
        aspect = rng.uniform(0.7, 1.0)
        angle = rng.uniform(0.0, np.pi)
        amplitudes, phases = rng.uniform(0.0, 0.12, size=3), rng.uniform(0.0, 2 * np.pi, size=3)
        # Only evaluate the blob's bounding square (max radius 1.36 * radius): keeps large resolutions cheap.
        reach = radius * (1.0 + amplitudes.sum())
        x0, x1 = max(0, int((cx - reach) * size)), min(size, int((cx + reach) * size) + 1)
        y0, y1 = max(0, int((cy - reach) * size)), min(size, int((cy + reach) * size) + 1)
        dx, dy = coords[None, x0:x1] - cx, coords[y0:y1, None] - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / aspect
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        theta = np.arctan2(v, u)
        boundary = 1.0 + sum(a * np.cos(k * theta + p) for k, a, p in zip((2, 3, 5), amplitudes, phases))
        mask[y0:y1, x0:x1] |= np.hypot(u, v) <= radius * boundary
    mask01 = mask.astype(np.uint8)
    # Guarantee "non-empty and not full" even at toy resolutions (a few pixels) where a blob can miss every centre.
    if not mask01.any():
        mask01[size // 2, size // 2] = 1
    if mask01.all():
        mask01[0, 0] = 0
    return mask01


def _tissue_image(rng: np.random.Generator, mask01: np.ndarray) -> np.ndarray:
    """Pinkish mucosa with soft shading and a few vessels; the lesion is redder, brighter and more granular."""
    size = mask01.shape[0]
    base = np.array([205.0, 120.0, 110.0], dtype=np.float32) + rng.uniform(-15.0, 15.0, size=3).astype(np.float32)
    shade = 0.12 * _smooth_noise(rng, size, 4) + 0.05 * _smooth_noise(rng, size, 8)
    tissue = base * (1.0 + shade[..., None])

    # Vessels: thin darker-red polylines along random smooth curves.
    vessels = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(1, 4))):
        t = np.linspace(0.0, 1.0, 12)
        start, end = rng.uniform(0.0, 1.0, size=(2, 2))
        wobble = 0.08 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * t + rng.uniform()))
        points = start[None] + (end - start)[None] * t[:, None] + wobble[:, None]
        cv2.polylines(vessels, [np.round(points * (size - 1)).astype(np.int32)], False, 1.0, 1, cv2.LINE_AA)
    tissue *= 1.0 - 0.3 * vessels[..., None] * np.array([0.3, 1.0, 1.0], dtype=np.float32)

    lesion_colour = np.array([225.0, 95.0, 80.0], dtype=np.float32) + rng.uniform(-10.0, 10.0, 3).astype(np.float32)
    granular = 0.1 * _smooth_noise(rng, size, max(2, size // 4))
    lesion = lesion_colour * (1.0 + granular[..., None])

    # Slightly soft edge (as in real images) while the lesion interior remains clearly distinct.
    alpha = cv2.GaussianBlur(mask01.astype(np.float32), (3, 3), 0)[..., None]
    image = (1.0 - alpha) * tissue + alpha * lesion

    # Endoscope-like vignetting.
    coords = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    radius2 = coords[None, :] ** 2 + coords[:, None] ** 2
    image *= (1.0 - 0.25 * radius2 / 2.0)[..., None]
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def synthetic_pair(index: int, resolution: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (uint8 RGB image, uint8 {0, 1} mask) of synthetic sample ``index``; a pure function of its inputs."""
    # SeedSequence over (seed, index): independent streams per sample, no overlap between e.g. (0, 1) and (1, 0).
    rng = np.random.default_rng((int(seed), int(index)))
    mask01 = _lesion_mask(rng, resolution)
    return _tissue_image(rng, mask01), mask01


class SyntheticLesionDataset(Dataset):
    """Procedural mask-image pairs with the same item dict as :class:`MaskImageDataset`."""

    def __init__(
        self,
        num_samples: int,
        resolution: int,
        seed: int = 0,
        hint_resolution: int | None = None,
        prompt: str = DEFAULT_PROMPT,
    ) -> None:
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        self.resolution, self.hint_resolution = _check_resolution(resolution, hint_resolution)
        self.num_samples = num_samples
        self.seed = seed
        self.prompt = prompt

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        index %= self.num_samples
        rgb, mask01 = synthetic_pair(index, self.resolution, self.seed)
        return make_sample(rgb, mask01, self.resolution, self.hint_resolution, self.prompt, f"synthetic_{index:06d}")


def _write_png(path: Path, array: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"cannot encode PNG for {path}")
    encoded.tofile(path)


def write_synthetic_dataset(
    root: str | Path,
    num_samples: int,
    resolution: int,
    seed: int = 0,
    *,
    prompt: str = DEFAULT_PROMPT,
    overwrite: bool = False,
) -> Path:
    """Write ``num_samples`` synthetic pairs as ``root/images/*.png``, ``root/masks/*.png`` (0/255) and
    ``root/prompt.json`` (relative paths). Returns the prompt file. Refuses to replace an existing prompt file
    unless ``overwrite``; the prompt file is written to a temporary name and renamed, so it is never half written.
    """
    if not isinstance(num_samples, int) or num_samples <= 0:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    _check_resolution(resolution, None)
    root = Path(root)
    prompt_file = root / PROMPT_FILE
    if prompt_file.exists() and not overwrite:
        raise FileExistsError(f"{prompt_file} already exists (pass overwrite=True to replace it)")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num_samples):
        rgb, mask01 = synthetic_pair(index, resolution, seed)
        name = f"synthetic_{index:06d}.png"
        # PNG for images too: lossless, so a round trip through MaskImageDataset reproduces the generated pixels.
        _write_png(root / "images" / name, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        _write_png(root / "masks" / name, mask_to_png(mask01))
        lines.append(json.dumps({"source": f"masks/{name}", "target": f"images/{name}", "prompt": prompt}))
    temporary = prompt_file.with_name(f".{PROMPT_FILE}.{os.getpid()}.tmp")
    temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(temporary, prompt_file)
    logger.info("wrote %d synthetic pairs (%d px) to %s", num_samples, resolution, root)
    return prompt_file
