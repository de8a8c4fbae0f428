"""MedDiff-FT's non-lesion generator at inference: repair the lesion of a real image into healthy tissue.

MedDiff-FT (Xie et al., MICCAI 2025) fine-tunes a second copy of the base with the lesion-focused loss's mask
inverted (``pretrain.unet.loss_region: background``: the model learns the healthy tissue around lesions) and uses it
to produce lesion-free backgrounds for background-preserving generation when a dataset has none. Repairing one
image is eq. 2 of the paper with the roles swapped: the region to generate is the lesion (its mask dilated by
``dilate`` pixels, so the lesion's rim goes too), everything else is the real image re-noised to each step
(``LatentDiffusion.sample(background=…, mask=…)``). The decoded sample is then pasted into the real image with a
feathered edge, so pixels away from the lesion are the real ones, exactly (the VAE does not touch them).

Each item's noise comes from its own seed, SHA-256 of (seed, name): the same repair whatever batch computes it (up
to float rounding of batched kernels). The output folder (``write_repairs``) is a background library:
``images/`` (``tutorial_inference.py --background OUT`` takes the folder), ``regions/`` (what was regenerated),
``manifest.jsonl``, ``grid.png`` (real | region | repaired) and ``provenance.json`` (``repair_provenance``: the
repaired real images by digest, as ``content``, and the records of the dataset and the generator), which pairs
sampled on these backgrounds inherit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import replace_dir
from ldm.model import LatentDiffusion

import cv2
import numpy as np
import torch

from siamese.data.images import read_image_rgb, resize_image, write_png
from siamese.data.layout import read_prompt_jsonl
from siamese.data.masks import mask_to_png, read_mask, resize_mask
from siamese.data.pairs import IMAGES_DIR, MANIFEST_NAME
from siamese.data.provenance import Provenance, dataset_record, read_provenance

REGIONS_DIR = "regions"
GRID_NAME = "grid.png"


@dataclass(frozen=True)
class RepairItem:
    """One real image and its lesion mask; ``name`` is unique in a run and names the output files."""

    name: str
    image: Path
    mask: Path
    prompt: str
    seed: int


@dataclass(frozen=True)
class Repaired:
    item: RepairItem
    real: np.ndarray  # H×W×3 uint8 at the model resolution
    region: np.ndarray  # H×W {0, 1}: what was regenerated (the dilated lesion)
    image: np.ndarray  # H×W×3 uint8: the repaired image


def repair_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{int(seed)}\x00repair\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def repair_items(dataset: str | Path, *, prompt: str, seed: int = 0, limit: int | None = None) -> list[RepairItem]:
    """The image-mask pairs of a ``prompt.json`` dataset (its folder or the file), named by image stem (made unique
    with the line number when two images share a stem)."""
    path = Path(dataset)
    if path.is_dir():
        path = path / "prompt.json"
    records = read_prompt_jsonl(path)
    stems = [record.target.stem for record in records]
    items = []
    for line, (record, stem) in enumerate(zip(records, stems)):
        name = stem if stems.count(stem) == 1 else f"{stem}_{line:06d}"
        items.append(RepairItem(name, record.target, record.source, prompt, repair_seed(seed, name)))
    return items[:limit] if limit is not None else items


def repair_provenance(items: Sequence[RepairItem], dataset: str | Path,
                      parents: Provenance | None = None) -> Provenance:
    """What a background library is made from: a ``content`` record of the real images (and their masks) it repairs,
    by digest, then the dataset folder's own ``provenance.json`` if it has one, then ``parents`` (the non-lesion
    generator's records)."""
    path = Path(dataset)
    folder = path if path.is_dir() else path.parent
    record = dataset_record(f"backgrounds repaired from {folder}", folder, [item.image for item in items],
                            [item.mask for item in items], role="content")
    return Provenance((record,)).merge(read_provenance(folder), parents)


def dilate_region(mask01: np.ndarray, pixels: int) -> np.ndarray:
    """The region to regenerate: the lesion grown by ``pixels`` (elliptic element; 0 = the lesion itself)."""
    if pixels < 0:
        raise ValueError(f"dilation must be >= 0 pixels, got {pixels}")
    if pixels == 0:
        return mask01.astype(np.uint8)
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask01.astype(np.uint8), element)


def paste_weights(region01: np.ndarray, lesion01: np.ndarray, feather: float) -> np.ndarray:
    """Per-pixel weight of the generated image: 1 on the lesion, a Gaussian fall-off (σ = ``feather`` px) of the
    region around it, and exactly 0 where the blurred region is below 1/255 (real pixels kept bit for bit)."""
    weight = region01.astype(np.float32)
    if feather > 0:
        weight = cv2.GaussianBlur(weight, (0, 0), sigmaX=feather, borderType=cv2.BORDER_REPLICATE)
        weight[weight < 1.0 / 255] = 0.0
    return np.maximum(weight, lesion01.astype(np.float32))


def _load(item: RepairItem, size: int) -> tuple[np.ndarray, np.ndarray]:
    rgb = read_image_rgb(item.image)
    mask = read_mask(item.mask)
    (h, w), (mh, mw) = rgb.shape[:2], mask.shape[:2]
    if abs(h / w - mh / mw) > 0.01 * (mh / mw):
        raise ValueError(f"{item.image} is {h}×{w} but its mask {item.mask} is {mh}×{mw}: different aspect ratios")
    real = resize_image(rgb, size)
    return real, resize_mask(mask, size)


@torch.no_grad()
def repair(model: LatentDiffusion, items: Sequence[RepairItem], *, size: int, dilate: int = 3,
           feather: float | None = None, steps: int = 50, cfg_scale: float = 9.0, sampler: str = "ddim",
           batch_size: int = 4) -> Iterator[Repaired]:
    """Repair each item's lesion with the non-lesion generator ``model`` (a loaded base ``LatentDiffusion`` in eval
    mode); yields results in item order. ``feather`` (σ of the paste edge, pixels) defaults to ``dilate / 2``."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    feather = dilate / 2 if feather is None else feather
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        loaded = [_load(item, size) for item in batch]
        lesions = [mask for _, mask in loaded]
        regions = [dilate_region(mask, dilate) for mask in lesions]
        real = torch.from_numpy(np.stack([rgb for rgb, _ in loaded])).permute(0, 3, 1, 2).float() / 127.5 - 1
        region = torch.from_numpy(np.stack(regions)).float()[:, None]
        generators = [torch.Generator().manual_seed(item.seed) for item in batch]
        generated = model.sample([item.prompt for item in batch], size, steps=steps, cfg_scale=cfg_scale,
                                 generator=generators, sampler=sampler, background=real.to(device),
                                 mask=region.to(device))
        generated = ((generated.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        for item, (rgb, _), lesion, reg, gen in zip(batch, loaded, lesions, regions, generated):
            weight = paste_weights(reg, lesion, feather)[..., None]
            out = np.where(weight > 0, rgb * (1 - weight) + gen * weight, rgb)
            yield Repaired(item, rgb, reg, np.clip(np.round(out), 0, 255).astype(np.uint8))


def _grid(results: Sequence[Repaired], cell: int) -> np.ndarray:
    """Rows of real | region | repaired, ``cell`` pixels each."""
    rows = []
    for r in results:
        tiles = [r.real, np.repeat(mask_to_png(r.region)[..., None], 3, axis=2), r.image]
        rows.append(np.concatenate([cv2.resize(t, (cell, cell), interpolation=cv2.INTER_NEAREST) for t in tiles], 1))
    return np.concatenate(rows, 0)


def write_repairs(results: Iterator[Repaired], out: Path, run_info: dict, *, grid: int = 8,
                  provenance: Provenance | None = None) -> int:
    """Write a background library into ``out`` (built complete in a temporary folder, then swapped in:
    ``ldm.fileio.replace_dir``), with ``provenance`` as ``out/provenance.json`` (``repair_provenance``); returns the
    count."""
    with replace_dir(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        (tmp / REGIONS_DIR).mkdir()
        if provenance is not None:
            provenance.write(tmp)
        shown: list[Repaired] = []
        count = _write_all(results, tmp, run_info, shown, grid)
        if shown:
            write_png(tmp / GRID_NAME, _grid(shown, cell=min(shown[0].image.shape[0], 128)))
    return count


def _write_all(results: Iterator[Repaired], tmp: Path, run_info: dict, shown: list[Repaired], grid: int) -> int:
    count = 0
    with open(tmp / MANIFEST_NAME, "w", encoding="utf-8") as manifest:
        for r in results:
            write_png(tmp / IMAGES_DIR / f"{r.item.name}.png", r.image)
            write_png(tmp / REGIONS_DIR / f"{r.item.name}.png", mask_to_png(r.region))
            manifest.write(json.dumps({"name": r.item.name, "image": f"{IMAGES_DIR}/{r.item.name}.png",
                                       "region": f"{REGIONS_DIR}/{r.item.name}.png", "source_image": str(r.item.image),
                                       "source_mask": str(r.item.mask), "prompt": r.item.prompt, "seed": r.item.seed,
                                       "region_area": round(float(r.region.mean()), 6), **run_info}) + "\n")
            if len(shown) < grid:
                shown.append(r)
            count += 1
    return count
