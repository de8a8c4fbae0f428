"""Quality filter for generated pairs (MedDiff-FT, Xie et al. 2025): keep a pair when its image is neither a
near-copy of a real image nor off the real domain, judged by feature cosine similarity.

For every generated image, ``s = max_j cos(f(x), f(r_j))`` over the real images ``r_j`` (its nearest real image in
the feature space of a frozen tower, DINOv2 through timm by default in the CLI, from a local weight file). A pair is
kept when ``low ≤ s ≤ high``. The paper gives the idea, not numbers that would carry over between feature networks,
so the default band is set by the real data themselves: ``high`` = the largest leave-one-out nearest-neighbour
similarity among the real images (a generated image closer to a real one than any two real images are to each other
is a near-copy), ``low`` = a low quantile (default 1 %) of the same leave-one-out similarities (farther from every
real image than almost every real image is from the rest: off-domain). Either bound can be given instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.fileio import replace_dir, write_json_atomic, write_text_atomic

import numpy as np

from siamese.data.pairs import IMAGES_DIR, MANIFEST_NAME, MASKS_DIR, copy_provenance, link_or_copy, rebased_record
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


def real_leave_one_out(real: np.ndarray) -> np.ndarray:
    """Each real image's similarity to its nearest *other* real image."""
    if len(real) < 2:
        raise ValueError(f"the filter's default band needs at least 2 real images, got {len(real)}")
    unit = _unit(real)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return sims.max(axis=1)


@dataclass(frozen=True)
class Band:
    low: float
    high: float
    low_source: str  # "given" or how it was derived
    high_source: str


def default_band(real: np.ndarray, low: float | None = None, high: float | None = None,
                 low_quantile: float = 0.01) -> Band:
    """The keep band: given bounds, or the ones the real images' leave-one-out similarities imply."""
    if not 0.0 <= low_quantile < 1.0:
        raise ValueError(f"low quantile must be in [0, 1), got {low_quantile}")
    loo = real_leave_one_out(real) if low is None or high is None else None
    derived_low = f"{low_quantile:g} quantile of the real leave-one-out similarity"
    band = Band(low=float(np.quantile(loo, low_quantile)) if low is None else float(low),
                high=float(loo.max()) if high is None else float(high),
                low_source=derived_low if low is None else "given",
                high_source="largest real leave-one-out similarity" if high is None else "given")
    if band.low > band.high:
        raise ValueError(f"filter band is empty: low {band.low:.4f} > high {band.high:.4f}")
    return band


@dataclass(frozen=True)
class Verdict:
    similarity: float
    nearest_real: int
    verdict: str  # kept | near-copy | off-domain


def judge(synthetic: np.ndarray, real: np.ndarray, band: Band) -> list[Verdict]:
    sims, index = nearest_similarity(synthetic, real)
    out = []
    for s, j in zip(sims.tolist(), index.tolist(), strict=True):
        verdict = "near-copy" if s > band.high else "off-domain" if s < band.low else "kept"
        out.append(Verdict(float(s), int(j), verdict))
    return out


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
            link_or_copy(src / record["image"], tmp / record["image"])
            link_or_copy(src / record["mask"], tmp / record["mask"])
            lines.append(json.dumps({**rebased_record(record, src, out), "filter_similarity": verdicts[name].similarity,
                                     "filtered_from": str(src)}))
        write_text_atomic(tmp / MANIFEST_NAME, "".join(line + "\n" for line in lines))
        write_json_atomic(tmp / REPORT_NAME, report, indent=1)
        copy_provenance(src, tmp)  # a subset of the same pairs: made from the same models and data
    return out
