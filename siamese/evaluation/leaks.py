"""The leak check that follows provenance: did any model behind a synthetic pair see a test image?

For every synthetic folder: its ``provenance.json`` (written by sampling: the checkpoint's records, the mask
generator's, the background library's) is walked, and a ``trained`` or ``content`` record that lists a test image
or test mask (by digest) refuses the folder in one line naming the model and one leaked test file. Then each pair:
its source mask must resolve (a digest in the manifest, or the file, relative to the manifest's folder); a pair
generated from a test mask is dropped (the test lesion's shape would reach training), a pair that kept a test image
as background is refused. A folder with no provenance, or a pair with no resolvable source, is refused, not
skipped. ``allow_leak`` turns refusals into warnings for a user who knowingly accepts them; reports print them at
the top. Near-duplicates of test images among the real training images are reported, not refused (the same picture
saved twice under two names, re-encoded or rescaled): the correlation of 32×32 gray thumbnails (zero-mean, unit
norm) ≥ ``NEAR_DUPLICATE_CORRELATION``. Measured on the demo's data (``python bench/near_duplicates.py SPLIT``): the
same image re-saved as JPEG q70 or rescaled 1.5× correlates ≥ 0.989; distinct train/test images ≤ 0.80.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from siamese.data.pairs import MANIFEST_NAME, read_manifest
from siamese.data.provenance import digest_file, read_provenance
from siamese.data.split import Pair
from siamese.evaluation.calibration import NEAR_DUPLICATE_CORRELATION, thumbnail

__all__ = ["NEAR_DUPLICATE_CORRELATION", "LeakError", "LeakReport", "check_synthetic", "near_duplicates",
           "read_synthetic", "thumbnail"]

logger = logging.getLogger(__name__)

class LeakError(ValueError):
    """Test data reached (or may have reached) a model behind the training data."""


@dataclass
class LeakReport:
    pairs: list[Pair]                      # the synthetic pairs that may train a segmenter
    excluded_test_masks: int = 0           # dropped: generated from a test mask
    warnings: list[str] = field(default_factory=list)


def read_synthetic(folders: Sequence[str | Path]) -> list[Pair]:
    """The pairs of sampling folders (``manifest.jsonl``), in manifest order, with their source mask resolved
    against the manifest's folder (relative values) and its digest (the manifest's, else the file's)."""
    pairs = []
    for folder in folders:
        folder = Path(folder)
        records = read_manifest(folder / MANIFEST_NAME)
        if not records:
            raise FileNotFoundError(f"{folder}: no {MANIFEST_NAME} with sampled pairs (a tutorial_inference.py --out?)")
        for record in records.values():
            name = f"{folder.name}/{record['name']}"
            value = record.get("source")
            source = None if not value else Path(value) if Path(value).is_absolute() else folder / value
            digest = record.get("source_digest")
            if digest is None and source is not None and source.is_file():
                digest = digest_file(source)
            if digest is None:
                raise LeakError(f"{folder / MANIFEST_NAME}: pair {record['name']} has no resolvable source mask "
                                f"({value!r} not found, no source_digest): it cannot be checked against the test "
                                "split; sample it again with this version")
            pairs.append(Pair(name, folder / record["image"], folder / record["mask"], record.get("prompt", ""),
                              source, digest, record.get("background_digest")))
    return pairs


def _refuse(message: str, allow_leak: bool, report: LeakReport) -> None:
    if not allow_leak:
        raise LeakError(f"{message} (pass --allow-generator-leak to accept it knowingly)")
    report.warnings.append(f"ACCEPTED LEAK: {message}")
    logger.warning("accepted leak: %s", message)


def check_synthetic(folders: Sequence[str | Path], test: Sequence[Pair], *, allow_leak: bool = False) -> LeakReport:
    """The synthetic pairs of ``folders`` that may join training without carrying the ``test`` pairs in."""
    test_images = {digest_file(p.image): p for p in test}
    test_masks = {digest_file(p.mask): p for p in test}
    report = LeakReport([])
    pairs = read_synthetic(folders)
    for folder in map(Path, folders):
        provenance = read_provenance(folder)
        if provenance is None:
            _refuse(f"{folder}: no provenance.json, so what made these pairs cannot be checked against the test split "
                    "(sampled before provenance was recorded? sample again)", allow_leak, report)
            continue
        for record in provenance.records:
            if record.role == "external":
                report.warnings.append(f"{folder}: made from {record.what}, whose training data is unknown "
                                       "(not checked)")
                continue
            hit = next((test_images[d] for d in record.images if d in test_images), None) or \
                next((test_masks[d] for d in record.masks if d in test_masks), None)
            if hit is not None:
                verb = "was trained on" if record.role == "trained" else "contains"
                _refuse(f"{folder}: {record.what} {verb} test pair {hit.name} ({hit.image})", allow_leak, report)
    for pair in pairs:
        if pair.source_digest in test_masks:
            report.excluded_test_masks += 1
            continue
        if pair.background_digest is not None and pair.background_digest in test_images:
            _refuse(f"synthetic pair {pair.name} kept test image {test_images[pair.background_digest].name} as its "
                    "background", allow_leak, report)
        report.pairs.append(pair)
    if report.excluded_test_masks:
        logger.info("excluded %d synthetic pairs generated from test masks (%d remain)", report.excluded_test_masks,
                    len(report.pairs))
    return report


def near_duplicates(train: Sequence[Pair], test: Sequence[Pair], threshold: float = NEAR_DUPLICATE_CORRELATION
                    ) -> list[tuple[str, str, float]]:
    """(train name, test name, correlation) for every train/test image pair whose thumbnails correlate ≥
    ``threshold``, most similar first."""
    if not train or not test:
        return []
    corr = np.stack([thumbnail(p.image) for p in train]) @ np.stack([thumbnail(p.image) for p in test]).T
    hits = np.argwhere(corr >= threshold)
    found = [(train[i].name, test[j].name, round(float(corr[i, j]), 4)) for i, j in hits]
    return sorted(found, key=lambda hit: -hit[2])
