"""Mask-image pair datasets for Siamese-Diffusion training and sampling, and the image dataset of base pretraining.

Samples follow the released preprocessing: the mask is binarised at gray level 127 *before* a nearest-neighbour
resize (so it stays binary; 0/1 label masks are recognised in the automatic mode, see ``siamese.data.masks``), the
image is resized to a square ``resolution`` (aspect ratio is not preserved, as in the original) and scaled to
[-1, 1]. Hints are channels-first in [0, 1]: ``mask_hint`` = the mask replicated to 3 channels and ``image_hint`` =
(image + 1) / 2, the image-branch hint of the paper. Prompt dropout is a training-time choice and is left to the
model. ``SyntheticLesionDataset`` serves the procedural pairs of ``siamese.data.synthetic`` so tiny configs, tests
and the demo run without any medical data on disk.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from siamese.data.images import (
    IMAGE_SUFFIXES,
    Intensity,
    aspect_ratios_differ,
    header_size,
    parse_intensity,
    read_image_rgb,
    resize_image,
)
from siamese.data.layout import DEFAULT_PROMPT, PROMPT_FILE, read_prompt_jsonl
from siamese.data.masks import (
    AUTO_THRESHOLD,
    DEFAULT_THRESHOLD,
    binarize_mask,
    is_label_mask,
    read_mask_gray,
    resize_mask,
)
from siamese.data.provenance import Record, dataset_record
from siamese.data.synthetic import synthetic_pair

__all__ = ["ImageDataset", "MaskImageDataset", "SyntheticLesionDataset", "dataset_prompts", "make_sample"]

logger = logging.getLogger(__name__)


def _rgb_to_signed(rgb: np.ndarray) -> np.ndarray:
    # numpy, not torch, for the per-pixel arithmetic: small torch ops inside DataLoader workers pay a large
    # per-call threading overhead on few-core machines.
    return rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def make_sample(
    rgb: np.ndarray, mask01: np.ndarray, resolution: int, hint_resolution: int, prompt: str, name: str
) -> dict[str, torch.Tensor | str]:
    """Build the sample dict shared by all datasets from uint8 RGB and a {0, 1} mask at any size."""
    image = _rgb_to_signed(resize_image(rgb, resolution))
    hint_source = image if hint_resolution == resolution else _rgb_to_signed(resize_image(rgb, hint_resolution))
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
    In the automatic mode a few masks are read at construction to log once which rule applies. ``intensity``
    (``data.intensity``): how 16-bit and float images become 8 bit (``siamese.data.images``; default auto).
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int,
        hint_resolution: int | None = None,
        prompt_override: str | None = None,
        *,
        threshold: int | None = AUTO_THRESHOLD,
        intensity: Intensity | str | None = None,
    ) -> None:
        self.resolution, self.hint_resolution = _check_resolution(resolution, hint_resolution)
        self.intensity = parse_intensity(intensity)
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
            logger.info("masks: label images (class values ≤ %d) detected (%d of %s): foreground = any non-zero "
                        "label; other masks: gray > %d (data.mask_threshold: auto)", DEFAULT_THRESHOLD, labels, scope,
                        DEFAULT_THRESHOLD)
        else:
            logger.info("masks: foreground = gray > %d (no label images among %s; data.mask_threshold: auto)",
                        DEFAULT_THRESHOLD, scope)

    def __len__(self) -> int:
        return len(self.records)

    def provenance_record(self, what: str) -> Record:
        """What a model trained on this dataset saw: every image and mask, by digest."""
        return dataset_record(what, self.prompt_file.parent, [r.target for r in self.records],
                              [r.source for r in self.records])

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
        rgb = read_image_rgb(record.target, self.intensity)
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


class ImageDataset(Dataset):
    """Unlabelled images with prompts, for base pretraining: items ``image`` (3×R×R in [-1, 1]), ``prompt``, ``name``.

    ``from_root`` takes a ``prompt.json`` layout (its ``target`` images and prompts; masks are not read) or a plain
    folder of images (searched recursively, hidden files skipped), every image with ``prompt``.
    """

    def __init__(self, paths: list[Path], prompts: list[str], resolution: int,
                 intensity: Intensity | str | None = None) -> None:
        if not paths:
            raise ValueError("ImageDataset: no images")
        self.paths, self.prompts = paths, prompts
        self.resolution, _ = _check_resolution(resolution, None)
        self.intensity = parse_intensity(intensity)

    @classmethod
    def from_root(cls, root: str | Path, resolution: int, prompt: str | None, prompt_override: str | None = None,
                  intensity: Intensity | str | None = None) -> ImageDataset:
        root = Path(root)
        prompt_file = root if root.is_file() else root / PROMPT_FILE
        if prompt_file.is_file():
            records = read_prompt_jsonl(prompt_file, require_target=True)
            paths = [r.target for r in records if r.target is not None]
            prompts = [prompt_override or r.prompt for r in records]
            return cls(paths, prompts, resolution, intensity)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root: no such folder or prompt file: {root}")
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not paths:
            raise ValueError(f"data.root {root}: no {PROMPT_FILE} and no images "
                             f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in it")
        if not (prompt_override or prompt):
            raise ValueError(f"data.root {root} is a plain folder of images: they carry no prompt; set data.prompt "
                             "(the prompt every image trains with) or use a prompt.json layout")
        return cls(paths, [prompt_override or prompt] * len(paths), resolution, intensity)

    def __len__(self) -> int:
        return len(self.paths)

    def provenance_record(self, what: str) -> Record:
        """What a model trained on these images saw, by digest."""
        root = os.path.commonpath([str(p.resolve().parent) for p in self.paths])
        return dataset_record(what, root, self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        rgb = resize_image(read_image_rgb(self.paths[index], self.intensity), self.resolution)
        return {"image": torch.from_numpy(_rgb_to_signed(rgb)), "prompt": self.prompts[index],
                "name": self.paths[index].stem}


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

    def provenance_record(self, what: str) -> Record:
        """Procedural pairs: no file of the user's reaches the model."""
        return Record("trained", what, note=f"procedural lesion pairs: {self.num_samples} (seed {self.seed})")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        index %= self.num_samples
        rgb, mask01 = synthetic_pair(index, self.resolution, self.seed)
        return make_sample(rgb, mask01, self.resolution, self.hint_resolution, self.prompt, f"synthetic_{index:06d}")


def dataset_prompts(dataset: Dataset) -> list[str]:
    """Every item's prompt as training sees it, read without loading a pixel: a prompt.json dataset's lines (its
    ``prompt_override`` when given), an image dataset's prompts, the generated pairs' one prompt; none (``[]``) for
    data without prompts (the mask generator's masks)."""
    if isinstance(dataset, MaskImageDataset):
        override = dataset.prompt_override
        return [r.prompt if override is None else override for r in dataset.records]
    if isinstance(dataset, ImageDataset):
        return list(dataset.prompts)
    if isinstance(dataset, SyntheticLesionDataset):
        return [dataset.prompt] * len(dataset)
    return []
