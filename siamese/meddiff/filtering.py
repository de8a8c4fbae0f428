"""Quality filter for generated pairs (MedDiff-FT, Xie et al. 2025): keep a pair when its image is neither a
near-copy of a real image nor off the real domain, judged by feature cosine similarity.

For every generated image, ``s = max_j cos(f(x), f(r_j))`` over the real images ``r_j`` (its nearest real image in
the feature space of a frozen tower, DINOv2 through timm by default in the CLI, from a local weight file). A pair is
kept when ``low ≤ s ≤ high``. The paper gives the idea, not numbers that would carry over between feature networks,
so the default band is set by the real data themselves (``siamese.evaluation.calibration``): ``high`` = the largest
leave-one-out nearest-neighbour similarity among the *distinct* real images (a generated image closer to a real one
than any two real images are to each other is a near-copy; real images with a near-duplicate among them are left
out, so one picture saved twice does not lift the bound to 1.0), ``low`` = a low quantile (default 1 %) of the same
similarities (farther from every real image than almost every real image is from the rest: off-domain). Either
bound can be given instead.

A pair generated on a background (background-preserving sampling, ``--background``) shares every pixel outside its
generated region with that background, so against the whole set it would always look like a copy of it. Such a pair
is judged against the *other* real images for both bounds (its own background excluded by digest), and against its
own background inside the generated region only: both images cropped to the region's bounding box, the pixels
outside the region set to mid-gray in each, and ``s_bg = cos(f(x_R), f(bg_R))`` compared with
``max_k cos(f(bg_R), f(r_k,R))`` over ``references`` other real images cropped the same way (seeded draw). A pair
whose region resembles its own background more than any other real image's same region does reproduced the
background instead of generating a lesion: a near-copy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.fileio import replace_dir, write_json_atomic, write_text_atomic

import cv2
import numpy as np

from siamese.data.pairs import IMAGES_DIR, MANIFEST_NAME, MASKS_DIR, copy_pair_files, copy_provenance, rebased_record
from siamese.evaluation.calibration import cosine_leave_one_out
from siamese.evaluation.features import ImageLike
from siamese.evaluation.quality import unit_rows

REPORT_NAME = "filter_report.json"


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float64)
    if not np.all(np.linalg.norm(features, axis=1) > 0):
        raise ValueError("a feature vector is all zeros: cosine similarity is undefined")
    return unit_rows(features)


def nearest_similarity(queries: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarity of every query to its nearest reference, and that reference's index."""
    sims = _unit(queries) @ _unit(references).T
    index = sims.argmax(axis=1)
    return sims[np.arange(len(queries)), index], index


def real_leave_one_out(real: np.ndarray, images: Sequence[ImageLike] | None = None) -> np.ndarray:
    """Each distinct real image's similarity to its nearest *other* real image (with ``images``, real images with a
    near-duplicate among them are left out: ``siamese.evaluation.calibration``)."""
    return cosine_leave_one_out(real, images).similarity


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    low_source: str  # "given" or how it was derived
    high_source: str
    duplicates: tuple[tuple[str, str, float], ...] = ()  # real near-duplicates left out of the calibration


def default_band(real: np.ndarray, low: float | None = None, high: float | None = None,
                 low_quantile: float = 0.01, images: Sequence[ImageLike] | None = None) -> Band:
    """The keep band: given bounds, or the ones the real images' leave-one-out similarities imply (``images``: the
    real images, so near-duplicates among them are found and left out of the calibration)."""
    if not 0.0 <= low_quantile < 1.0:
        raise ValueError(f"low quantile must be in [0, 1), got {low_quantile}")
    loo = cosine_leave_one_out(real, images) if low is None or high is None else None
    derived_low = f"{low_quantile:g} quantile of the real leave-one-out similarity"
    band = Band(low=float(np.quantile(loo.similarity, low_quantile)) if low is None else float(low),
                high=loo.largest if high is None else float(high),
                low_source=derived_low if low is None else "given",
                high_source="largest leave-one-out similarity of distinct real images" if high is None else "given",
                duplicates=tuple(loo.duplicates) if loo is not None else ())
    if band.low > band.high:
        raise ValueError(f"filter band is empty: low {band.low:.4f} > high {band.high:.4f}")
    return band


@dataclass(frozen=True)
class Verdict:
    similarity: float  # to the nearest real image (other than the pair's own background)
    nearest_real: int
    verdict: str  # kept | near-copy | off-domain
    background_similarity: float | None = None  # region similarity to the pair's own background, when it has one
    background_bound: float | None = None  # the largest region similarity of its background to other real images


@dataclass(frozen=True)
class OwnBackground:
    """A pair's comparison with its own background, inside the generated region (features of the region crops)."""

    similarity: float  # cos(f(x_R), f(bg_R))
    bound: float  # max_k cos(f(bg_R), f(r_k,R))
    real_index: int | None  # the background's index among the real images (excluded from the nearest), if there


def region_crop(rgb: np.ndarray, region01: np.ndarray) -> np.ndarray:
    """``rgb`` cropped to the bounding box of ``region01`` (same H×W), pixels outside the region mid-gray: what a
    comparison "inside the generated region only" looks at."""
    if region01.shape != rgb.shape[:2]:
        region01 = cv2.resize(region01.astype(np.uint8), rgb.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    ys, xs = np.nonzero(region01)
    if not len(ys):
        raise ValueError("the generated region is empty: nothing to compare with the background")
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = rgb[y0:y1, x0:x1].copy()
    crop[region01[y0:y1, x0:x1] == 0] = 128
    return crop


def judge(synthetic: np.ndarray, real: np.ndarray, band: Band,
          own: Sequence[OwnBackground | None] | None = None) -> list[Verdict]:
    """Verdicts from the features of the generated and the real images; ``own`` (one per generated image, None
    where it has no background) excludes the pair's own background from its nearest real image and adds the region
    comparison with it."""
    own = list(own) if own is not None else [None] * len(synthetic)
    if len(own) != len(synthetic):
        raise ValueError(f"{len(synthetic)} generated images but {len(own)} background comparisons")
    sims = _unit(synthetic) @ _unit(real).T
    for row, check in enumerate(own):
        if check is not None and check.real_index is not None:
            sims[row, check.real_index] = -np.inf
    index = sims.argmax(axis=1)
    out = []
    for row, j in enumerate(index.tolist()):
        s, check = float(sims[row, j]), own[row]
        copy = s > band.high or (check is not None and check.similarity > check.bound)
        verdict = "near-copy" if copy else "off-domain" if s < band.low else "kept"
        out.append(Verdict(s, int(j), verdict, None if check is None else check.similarity,
                           None if check is None else check.bound))
    return out


def own_background(features, image: np.ndarray, background: np.ndarray, region01: np.ndarray,
                   references: Sequence[np.ndarray], real_index: int | None) -> OwnBackground:
    """``OwnBackground`` of one pair: ``features`` maps a list of uint8 RGB images to (N, d) features; the
    background and the ``references`` (other real images) are resized to the generated image's size first and
    ``region01`` is the generated region at that size."""
    height, width = image.shape[:2]

    def at_size(rgb: np.ndarray) -> np.ndarray:
        return rgb if rgb.shape[:2] == (height, width) else cv2.resize(rgb, (width, height),
                                                                        interpolation=cv2.INTER_AREA)

    crops = [region_crop(at_size(x), region01) for x in (image, background, *references)]
    unit = _unit(features(crops))
    bound = float((unit[2:] @ unit[1]).max()) if len(references) else 1.0
    return OwnBackground(float(unit[0] @ unit[1]), bound, real_index)


def write_kept(src: Path, out: Path, records: Mapping[str, dict[str, Any]], verdicts: Mapping[str, Verdict],
               report: dict[str, Any]) -> Path:
    """``out`` as a pairs folder of the kept pairs of ``src`` (images and masks hard-linked where possible, else
    copied; each kept manifest line plus its ``filter_similarity``, its ``source`` and ``background`` made relative
    to ``out``), ``out/filter_report.json`` and ``src``'s ``provenance.json``; built complete and swapped in
    (``ldm.fileio.replace_dir``). ``src`` is never modified."""
    with replace_dir(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        (tmp / MASKS_DIR).mkdir()
        lines = []
        for name, record in records.items():
            if verdicts[name].verdict != "kept":
                continue
            copy_pair_files(record, src, tmp)
            lines.append(json.dumps({**rebased_record(record, src, out), "filter_similarity": verdicts[name].similarity,
                                     "filtered_from": str(src)}))
        write_text_atomic(tmp / MANIFEST_NAME, "".join(line + "\n" for line in lines))
        write_json_atomic(tmp / REPORT_NAME, report, indent=1)
        copy_provenance(src, tmp)  # a subset of the same pairs: made from the same models and data
    return out
