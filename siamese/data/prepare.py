"""Turn two folders (images, masks) into the training layout: ``ROOT/images``, ``ROOT/masks``, ``ROOT/prompt.json``.

Public segmentation datasets ship images and masks as separate folders paired by file name, often with a suffix on
the mask (ISIC: ``ISIC_0000000.jpg`` / ``ISIC_0000000_segmentation.png``) and a different extension. This module
pairs them by file stem, detecting the mask suffix when it is unambiguous, and writes the layout
``MaskImageDataset`` reads: copies (or symlinks) named after the image's stem, so an image and its mask share a
name, and a JSONL ``prompt.json`` with paths relative to ROOT. Nothing existing is replaced without ``overwrite``;
every file is written under a temporary name and renamed, so an interrupted run leaves no half-written file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ldm.fileio import atomic_path, copy_file_atomic, write_text_atomic

from siamese.data.images import IMAGE_SUFFIXES
from siamese.data.layout import DEFAULT_PROMPT, PROMPT_FILE

__all__ = ["MASK_SUFFIXES", "Pairing", "list_image_files", "pair_files", "prepare_dataset"]

logger = logging.getLogger(__name__)

# Tried, with the empty suffix, when no mask suffix is given; case matters (ISIC 2016 used "_Segmentation").
MASK_SUFFIXES = ("_segmentation", "_Segmentation", "_mask", "_Mask", "-mask", "_seg", "_gt", "_label")
SHOWN = 5  # unmatched names shown in messages


@dataclass(frozen=True)
class Pairing:
    """The result of pairing: (image, mask) files, the mask suffix used, and what found no partner."""

    pairs: list[tuple[Path, Path]]
    suffix: str
    detected: bool  # True when the suffix was recognised rather than given
    images_without_mask: list[Path] = field(default_factory=list)
    masks_without_image: list[Path] = field(default_factory=list)


def list_image_files(folder: str | Path, what: str) -> list[Path]:
    """Image files directly inside ``folder`` (no recursion), hidden files skipped, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{what} folder {folder} has no image files directly inside it "
                         f"({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}; sub-folders are not searched)")
    return files


def _by_stem(files: Sequence[Path], what: str) -> dict[str, Path]:
    stems: dict[str, Path] = {}
    for path in files:
        if path.stem in stems:
            raise ValueError(f"{what}: two files share the name '{path.stem}' ({stems[path.stem].name}, {path.name}); "
                             f"keep one so each name pairs with one file")
        stems[path.stem] = path
    return stems


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(p.name for p in paths[:SHOWN])
    return shown + (f", … (+{len(paths) - SHOWN})" if len(paths) > SHOWN else "")


def _shown(suffix: str) -> str:
    return repr(suffix) if suffix else "'' (same name)"


def pair_files(images: Sequence[Path], masks: Sequence[Path], mask_suffix: str | None = None, *,
               same_folder: bool = False) -> Pairing:
    """Pair image and mask files: the mask of image ``NAME.ext`` is ``NAME<suffix>.ext2`` (extensions may differ).

    ``mask_suffix=None`` tries the empty suffix and ``MASK_SUFFIXES`` and keeps the one that pairs the most files;
    a tie between candidates that pair files raises ValueError asking for the suffix. ``same_folder``: images and
    masks share one folder, so the empty suffix (every file its own mask) is not a candidate and the files used as
    masks are not reported as images without a mask (nor the images as masks without an image). Raises ValueError
    when nothing pairs.
    """
    image_stems, mask_stems = _by_stem(images, "images"), _by_stem(masks, "masks")
    if mask_suffix is not None:
        if same_folder and not mask_suffix:
            raise ValueError("images and masks are in the same folder: give the masks' name suffix (--mask-suffix)")
        candidates = [mask_suffix]
    else:
        candidates = ([] if same_folder else [""]) + list(MASK_SUFFIXES)
    counts = {s: sum(stem + s in mask_stems for stem in image_stems) for s in candidates}
    best = max(counts.values())
    if best == 0:
        tried = ", ".join(_shown(s) for s in candidates)
        raise ValueError(f"no image/mask pairs: {len(image_stems)} images (e.g. {_names(list(image_stems.values()))}) "
                         f"and {len(mask_stems)} masks (e.g. {_names(list(mask_stems.values()))}) share no name with "
                         f"mask suffix {tried}; pass --mask-suffix")
    winners = [s for s, n in counts.items() if n == best]
    if len(winners) > 1:
        raise ValueError(f"ambiguous mask suffix: {' and '.join(_shown(s) for s in winners)} each pair {best} files; "
                         f"pass --mask-suffix to choose")
    suffix = winners[0]
    pairs = [(image, mask_stems[stem + suffix]) for stem, image in image_stems.items() if stem + suffix in mask_stems]
    used_masks = {mask for _, mask in pairs}
    used_images = {image for image, _ in pairs}
    lonely_images = [p for s, p in image_stems.items() if s + suffix not in mask_stems
                     and not (same_folder and p in used_masks)]
    lonely_masks = [p for p in mask_stems.values() if p not in used_masks and not (same_folder and p in used_images)]
    return Pairing(pairs=pairs, suffix=suffix, detected=mask_suffix is None,
                   images_without_mask=lonely_images, masks_without_image=lonely_masks)


def _place(source: Path, destination: Path, link: bool) -> None:
    """Copy (or symlink) ``source`` to ``destination`` via a temporary name and an atomic rename."""
    if not link:
        copy_file_atomic(source, destination)
        return
    with atomic_path(destination) as temporary:
        temporary.symlink_to(source.resolve())


def _in_place(source: Path, destination: Path, link: bool) -> bool:
    """The destination already is the source file (``out`` holds the originals) or, with ``link``, a link to it."""
    if destination.is_symlink():
        return link and destination.resolve() == source.resolve()
    return destination.exists() and destination.resolve() == source.resolve()


def prepare_dataset(images_dir: str | Path, masks_dir: str | Path, out: str | Path, *,
                    mask_suffix: str | None = None, prompt: str = DEFAULT_PROMPT, link: bool = False,
                    overwrite: bool = False) -> Pairing:
    """Pair ``images_dir`` with ``masks_dir`` and write ``out/images``, ``out/masks`` and ``out/prompt.json``.

    Files are copied (symlinked with ``link``; the links are absolute) as ``images/NAME.ext`` and
    ``masks/NAME.ext2`` (the mask renamed to its image's stem, so the dataset's sample names are the image names).
    An existing prompt.json or destination file is refused unless ``overwrite``; a file that already is its own
    destination (``out`` is the folder the files are in) is left as it is. Returns the pairing.
    """
    images_dir, masks_dir, out = Path(images_dir), Path(masks_dir), Path(out)
    same_folder = images_dir.resolve() == masks_dir.resolve()
    pairing = pair_files(list_image_files(images_dir, "images"), list_image_files(masks_dir, "masks"), mask_suffix,
                         same_folder=same_folder)
    prompt_file = out / PROMPT_FILE
    if prompt_file.exists() and not overwrite:
        raise FileExistsError(f"{prompt_file} already exists; pass --force to replace it")
    plan: list[tuple[Path, Path]] = []
    lines: list[str] = []
    for image, mask in pairing.pairs:
        target = Path("images") / image.name
        source = Path("masks") / f"{image.stem}{mask.suffix}"
        plan += [(image, out / target), (mask, out / source)]
        lines.append(json.dumps({"source": source.as_posix(), "target": target.as_posix(), "prompt": prompt}))
    # Skip what is already in place; refuse to replace anything else before writing a single file.
    plan = [(src, dst) for src, dst in plan if not _in_place(src, dst, link)]
    taken = [dst for _, dst in plan if dst.exists() or dst.is_symlink()]
    if taken and not overwrite:
        raise FileExistsError(f"{len(taken)} output file(s) already exist, e.g. {taken[0]}; pass --force to replace "
                              f"them")
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for src, dst in plan:
        _place(src, dst, link)
    write_text_atomic(prompt_file, "\n".join(lines) + "\n")

    how = "detected" if pairing.detected else "given"
    logger.info("%d pairs (mask suffix %s, %s) → %s (%s)", len(pairing.pairs), _shown(pairing.suffix), how,
                prompt_file, "symlinks" if link else "copies")
    if pairing.images_without_mask:
        logger.warning("%d images without a mask (skipped): %s", len(pairing.images_without_mask),
                       _names(pairing.images_without_mask))
    if pairing.masks_without_image:
        logger.warning("%d masks without an image (skipped): %s", len(pairing.masks_without_image),
                       _names(pairing.masks_without_image))
    return pairing
