"""Images and their features for the image-quality measures (``siamese.evaluation.quality``): image loading, pixel
vectors, the ``FeatureExtractor`` (a frozen network and its preprocessing), and the readers of sampling runs and
datasets. The networks themselves come from local weight files through ``siamese.evaluation.towers``.

Images enter as uint8 RGB H×W×3 arrays or image paths; every extractor resizes to its input size with PIL's
antialiased bicubic filter (the resize Clean-FID, Parmar et al. 2022, recommends), squashing the aspect ratio as the
training data pipeline does, so an image's features never depend on the batch it is in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from ldm.progress import progress as progress_of

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from siamese.data.images import IMAGE_SUFFIXES, read_image_rgb, resize_image
from siamese.data.layout import PROMPT_FILE, read_prompt_jsonl
from siamese.data.pairs import MANIFEST_NAME, read_manifest

__all__ = [
    "DEFAULT_PIXEL_SIZE",
    "FeatureExtractor",
    "RunImage",
    "equal_count",
    "pixel_vectors",
    "read_dataset_images",
    "read_run_images",
]

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class ImageFile:
    """An image file decoded with a chosen ``data.intensity`` (16-bit / float real data); a plain path is decoded
    with ``auto``."""

    path: Path
    intensity: str = "auto"

    def __str__(self) -> str:
        return str(self.path)


ImageLike = str | Path | ImageFile | np.ndarray


DEFAULT_PIXEL_SIZE = 64


# --------------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------------


def _load_rgb(image: ImageLike, index: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image #{index}: expected a uint8 RGB array H×W×3, got {image.dtype} {image.shape}")
        return image
    if isinstance(image, ImageFile):
        return read_image_rgb(image.path, image.intensity)
    if isinstance(image, (str, Path)):
        return read_image_rgb(image)
    raise TypeError(f"image #{index}: expected a uint8 RGB array or an image path, got {type(image).__name__}")


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    if rgb.shape[:2] == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def _label(image: ImageLike, index: int) -> str:
    return str(image) if isinstance(image, (str, Path, ImageFile)) else f"#{index}"


def pixel_vectors(images: Sequence[ImageLike], size: int = DEFAULT_PIXEL_SIZE, gray: bool = False) -> np.ndarray:
    """Images at ``size``×``size`` (the one resize rule, ``siamese.data.images.resize_image``), in [0, 1], flattened:
    float32 (N, size²·3), or (N, size²) with ``gray``."""
    if size <= 0:
        raise ValueError(f"pixel size must be positive, got {size}")
    rows = []
    for index, image in enumerate(images):
        small = resize_image(_load_rgb(image, index), size)
        if gray:
            small = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
        rows.append(small.reshape(-1).astype(np.float32) / np.float32(255.0))
    if not rows:
        raise ValueError("pixel_vectors: no images")
    return np.stack(rows)


# --------------------------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """A frozen network and its preprocessing: ``features(images)`` → float64 (N, d).

    ``uint8_input``: the network takes uint8 RGB B×3×H×W as is (torch-fidelity's Inception normalises inside);
    otherwise images are scaled to [0, 1] and normalised with ``mean``/``std``.
    """

    spec: str
    module: nn.Module
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    uint8_input: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _dim: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module = self.module.to(self.device).eval().requires_grad_(False)

    def to(self, device: str | torch.device) -> FeatureExtractor:
        """Move the network to ``device`` (features are computed there)."""
        self.device = torch.device(device)
        self.module = self.module.to(self.device)
        return self

    def _batch(self, rgbs: list[np.ndarray]) -> Tensor:
        height, width = self.input_size
        array = np.stack([_resize(rgb, height, width) for rgb in rgbs]).transpose(0, 3, 1, 2)
        batch = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        if self.uint8_input:
            return batch
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        return (batch.float() / 255.0 - mean) / std

    def _forward(self, batch: Tensor) -> Tensor:
        out = self.module(batch)
        if isinstance(out, (tuple, list)):  # torch-fidelity returns one tensor per requested feature
            out = out[0]
        return out.reshape(out.shape[0], -1)

    @torch.no_grad()
    def features(self, images: Sequence[ImageLike], batch_size: int = 32, progress: bool = True) -> np.ndarray:
        """Features of uint8 RGB H×W×3 arrays or image paths, in order: float64 (N, d)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(images) == 0:
            raise ValueError(f"{self.spec}: no images to extract features from")
        chunks = []
        starts = range(0, len(images), batch_size)
        for start in progress_of(starts, desc=f"features {self.spec}", unit="batch", disable=not progress,
                                 leave=False, lines=5):
            rgbs = [_load_rgb(image, start + i) for i, image in enumerate(images[start:start + batch_size])]
            chunks.append(self._forward(self._batch(rgbs)).double().cpu().numpy())
        feats = np.concatenate(chunks)
        self._dim = feats.shape[1]
        if not np.isfinite(feats).all():
            raise ValueError(f"{self.spec}: the network produced non-finite features (broken weights?)")
        return feats

    @property
    def dim(self) -> int:
        """Feature dimension (one forward pass of a blank image the first time, unless features ran before)."""
        if self._dim is None:
            self.features([np.zeros((*self.input_size, 3), np.uint8)], progress=False)
        assert self._dim is not None
        return self._dim


# --------------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------------


class RunImage(NamedTuple):
    name: str
    source: str  # the conditioning mask (manifest ``source``): groups the samples of one mask
    path: Path


def read_run_images(out_dir: str | Path) -> list[RunImage]:
    """Images of a sampling run (``OUT/manifest.jsonl``), in a deterministic order: by sample index k, then mask,
    then name, so that the first N cover as many different masks as possible."""
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST_NAME
    if not manifest.is_file():
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {out_dir} (not a tutorial_inference.py output folder?)")
    records = read_manifest(manifest)
    if not records:
        raise ValueError(f"{manifest}: no records")
    rows = []
    for record in records.values():
        if "image" not in record:
            raise ValueError(f"{manifest}: record {record['name']} has no 'image' key")
        path = out_dir / str(record["image"])
        if not path.is_file():
            raise FileNotFoundError(f"{manifest}: image of {record['name']} is missing: {path}")
        # The mask a pair was generated from: by digest (the same mask in any folder), else as the manifest names it.
        source = str(record.get("source_digest") or record.get("source", record.get("source_name", record["name"])))
        k = record.get("k", 0)
        rows.append((int(k) if isinstance(k, (int, float)) else 0, source, str(record["name"]), path))
    rows.sort(key=lambda row: row[:3])
    return [RunImage(name, source, path) for _, source, name, path in rows]


def read_dataset_images(path: str | Path) -> list[Path]:
    """Images of a real dataset: the ``target`` images of a prompt.json (the file, or a folder holding one), in file
    order; else every image file under the folder (recursive, sorted)."""
    path = Path(path)
    if path.is_dir() and (path / PROMPT_FILE).is_file():
        path = path / PROMPT_FILE
    if path.is_file():
        return [record.target for record in read_prompt_jsonl(path) if record.target is not None]
    if not path.is_dir():
        raise FileNotFoundError(f"dataset not found: {path} (expected a prompt.json or a folder of images)")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) and no {PROMPT_FILE}")
    return images


def equal_count(real: Sequence[Any], synthetic: Sequence[Any], count: int | None = None
                ) -> tuple[list[Any], list[Any]]:
    """The first ``count`` (default: all real images) of each list, for FID between the training images and an EQUAL
    number of synthetic images. Raises one line when either list is shorter than the count."""
    n = len(real) if count is None else count
    if n < 2:
        raise ValueError(f"equal_count: need a count of at least 2, got {n}")
    if len(real) < n:
        raise ValueError(f"only {len(real)} real images for a count of {n}")
    if len(synthetic) < n:
        raise ValueError(f"only {len(synthetic)} synthetic images for {n} real ones (sample more, or pass a count ≤ "
                         f"{len(synthetic)})")
    return list(real[:n]), list(synthetic[:n])
