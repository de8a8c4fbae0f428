"""NIfTI volumes (``.nii`` / ``.nii.gz``, read with nibabel) as 2D image–mask pairs in the training layout.

A volume dataset (an image volume and a label volume per case, as CT/MRI segmentation sets ship) becomes PNG slices
that every other tool reads: ``OUT/images/CASE_AXISNNN.png`` (8-bit gray), ``OUT/masks/CASE_AXISNNN.png`` (0/255)
and ``OUT/prompt.json``. What is done, in order:

* **Orientation**: both volumes are reoriented to the closest canonical (RAS+) orientation
  (``nibabel.as_closest_canonical``), so ``axis`` means the same anatomy whatever the scanner's storage order:
  0 = sagittal (x), 1 = coronal (y), 2 = axial (z). Each slice is rotated by 90° so that anterior/superior is up.
  The two volumes must have the same shape and (after reorientation) the same affine within 1e-3 mm.
* **Labels**: ``labels`` (e.g. ``(1, 2)``) are the foreground; the default is every non-zero label.
* **Slices**: ``lesion`` (default) keeps the slices whose mask has foreground; ``all`` keeps every slice; ``step``
  keeps every n-th of those.
* **Intensity window, per volume** (so the slices of one volume keep their relative brightness): ``percentile:LOW,HIGH``
  (default 0.5, 99.5, over the whole volume), ``minmax``, or fixed values ``LO,HI`` in the volume's units (e.g.
  ``-160,240`` Hounsfield units for abdominal soft tissue); values are clipped to the window and scaled to 0..255.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ldm.fileio import replace_dir, write_text_atomic

import numpy as np

from siamese.data.images import write_png
from siamese.data.layout import PROMPT_FILE
from siamese.data.masks import mask_to_png

__all__ = ["NIFTI_SUFFIXES", "NiftiSettings", "is_nifti", "nifti_stem", "pair_volumes", "parse_labels",
           "parse_window", "prepare_nifti_dataset", "volume_slices"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AXIS_NAMES = ("x", "y", "z")


def is_nifti(path: Path) -> bool:
    return any(path.name.lower().endswith(s) for s in NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def parse_window(spec: str) -> tuple[str, tuple[float, float]]:
    """``percentile[:LOW,HIGH]``, ``minmax`` or ``LO,HI`` → (kind, values)."""
    spec = spec.strip()
    if spec == "minmax":
        return "minmax", (0.0, 0.0)
    kind, _, rest = spec.partition(":")
    try:
        if kind == "percentile":
            low, high = (float(v) for v in rest.split(",")) if rest else (0.5, 99.5)
            if not 0.0 <= low < high <= 100.0:
                raise ValueError
            return "percentile", (low, high)
        low, high = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"window {spec!r}: expected percentile[:LOW,HIGH] (0 <= LOW < HIGH <= 100), minmax, or "
                         "LO,HI in the volume's units") from None
    if not low < high:
        raise ValueError(f"window {spec!r}: LO must be below HI")
    return "values", (low, high)


@dataclass(frozen=True)
class NiftiSettings:
    axis: int = 2
    slices: str = "lesion"  # lesion | all
    step: int = 1
    labels: tuple[int, ...] | None = None  # None: every non-zero label
    window: str = "percentile:0.5,99.5"

    def __post_init__(self) -> None:
        if self.axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2 (x, y, z after reorientation to RAS), got {self.axis}")
        if self.slices not in ("lesion", "all"):
            raise ValueError(f"slices must be 'lesion' or 'all', got {self.slices!r}")
        if self.step < 1:
            raise ValueError(f"step must be >= 1, got {self.step}")
        parse_window(self.window)


def _load(path: Path):
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel raises many types for a damaged file
        raise ValueError(f"cannot read NIfTI volume {path}: {error}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {data.shape} (split 4-D series per channel first)")
    return data, image.affine


def _window(volume: np.ndarray, spec: str) -> np.ndarray:
    kind, (low, high) = parse_window(spec)
    values = volume.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError("the volume holds NaN or infinite values")
    if kind == "percentile":
        low, high = np.percentile(values, (low, high))
    elif kind == "minmax":
        low, high = float(values.min()), float(values.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8)


def volume_slices(image_path: Path, label_path: Path, settings: NiftiSettings
                  ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(slice index, uint8 image H×W, {0, 1} mask H×W) of the kept slices of one case."""
    image, image_affine = _load(image_path)
    label, label_affine = _load(label_path)
    if image.shape != label.shape:
        raise ValueError(f"{label_path}: label volume {label.shape} does not match image volume {image.shape} "
                         f"({image_path})")
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise ValueError(f"{label_path}: its affine differs from {image_path}'s: the label does not lie on the image")
    if not np.allclose(label, np.round(label)):
        raise ValueError(f"{label_path}: label values must be integers, found {np.unique(label)[:6]}")
    label = np.round(label).astype(np.int64)
    found = sorted(int(v) for v in np.unique(label) if v != 0)
    if settings.labels is not None:
        if not any(v in found for v in settings.labels):
            logger.warning("%s: none of labels %s present (found %s)", label_path, list(settings.labels), found)
        mask = np.isin(label, settings.labels)
    else:
        mask = label != 0
    gray = _window(image, settings.window)
    kept = []
    for index in range(image.shape[settings.axis]):
        mask2d = np.rot90(np.take(mask, index, axis=settings.axis)).astype(np.uint8)
        if settings.slices == "lesion" and not mask2d.any():
            continue
        kept.append((index, np.ascontiguousarray(np.rot90(np.take(gray, index, axis=settings.axis))),
                     np.ascontiguousarray(mask2d)))
    return kept[:: settings.step]


def pair_volumes(images_dir: Path, masks_dir: Path, mask_suffix: str | None = None) -> list[tuple[str, Path, Path]]:
    """(case, image volume, label volume) by case name: the label of ``CASE.nii.gz`` is ``CASE<suffix>.nii(.gz)``;
    without ``mask_suffix`` the suffix is recognised among '', _seg, _label, _mask, _gt (the one pairing the most;
    '' only for two different folders)."""
    def volumes(folder: Path) -> dict[str, Path]:
        if not folder.is_dir():
            raise FileNotFoundError(f"no such folder: {folder}")
        return {nifti_stem(p): p for p in sorted(folder.iterdir())
                if p.is_file() and is_nifti(p) and not p.name.startswith(".")}

    images, labels = volumes(images_dir), volumes(masks_dir)
    same = images_dir.resolve() == masks_dir.resolve()
    candidates = [mask_suffix] if mask_suffix is not None else ["", "_seg", "_label", "_mask", "_gt"]
    best: list[tuple[str, Path, Path]] = []
    for suffix in candidates:
        if same and not suffix:
            continue
        pairs = [(case, path, labels[case + suffix]) for case, path in images.items()
                 if case + suffix in labels and not (same and suffix and case.endswith(suffix))]
        if len(pairs) > len(best):
            best = pairs
    if not images:
        raise FileNotFoundError(f"no NIfTI volumes (.nii, .nii.gz) in {images_dir}")
    if not best:
        raise ValueError(f"no image volume in {images_dir} has a label volume in {masks_dir} (tried suffixes "
                         f"{candidates}); pass --mask-suffix")
    return best


def prepare_nifti_dataset(images_dir: str | Path, masks_dir: str | Path, out: str | Path, settings: NiftiSettings,
                          *, prompt: str, mask_suffix: str | None = None, overwrite: bool = False) -> int:
    """Write ``out`` (images/, masks/, prompt.json) from the paired volumes; built complete in a temporary folder
    and swapped in. Returns the number of pairs written."""
    images_dir, masks_dir, out = Path(images_dir), Path(masks_dir), Path(out)
    if (out / PROMPT_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out / PROMPT_FILE} already exists; pass --force to replace it")
    cases = pair_volumes(images_dir, masks_dir, mask_suffix)
    axis = AXIS_NAMES[settings.axis]
    lines: list[str] = []
    with replace_dir(out) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for case, image_path, label_path in cases:
            slices = volume_slices(image_path, label_path, settings)
            for index, gray, mask01 in slices:
                name = f"{case}_{axis}{index:03d}"
                write_png(tmp / "images" / f"{name}.png", gray)
                write_png(tmp / "masks" / f"{name}.png", mask_to_png(mask01))
                lines.append(json.dumps({"source": f"masks/{name}.png", "target": f"images/{name}.png",
                                         "prompt": prompt, "volume": image_path.name, "slice": index,
                                         "axis": settings.axis}))
            logger.info("%s: %d slices along %s", case, len(slices), axis)
        if not lines:
            raise ValueError(f"no slices kept from {len(cases)} volumes (slices={settings.slices!r}: are the label "
                             "volumes empty, or --labels absent from them?)")
        write_text_atomic(tmp / PROMPT_FILE, "\n".join(lines) + "\n")
    logger.info("%d pairs from %d volumes → %s", len(lines), len(cases), out / PROMPT_FILE)
    return len(lines)


def parse_labels(spec: str | None) -> tuple[int, ...] | None:
    if spec is None:
        return None
    try:
        values = tuple(int(v) for v in spec.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--labels {spec!r}: expected integers separated by commas, e.g. 1,2") from None
    if not values:
        raise ValueError("--labels is empty")
    return values
