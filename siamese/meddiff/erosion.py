"""Mask erosion ("corrosion", MedDiff-FT, Xie et al., MICCAI 2025) of an existing pairs folder into a new one.

MedDiff-FT erodes the masks of generated pairs by a few pixels so that a label lies inside the soft boundary of the
generated lesion. ``tutorial_inference.py --erode K`` does it while sampling (``siamese.data.pairs.PairWriter``);
``erode_folder`` does it afterwards: the new folder gets the same images (hard links where the file system allows,
else copies), the eroded masks, the masks the images were generated from (``conditioning_masks/``, hard links to the
source's masks: mask fidelity is scored against them) and a manifest whose lines record ``erode``, ``erode_kernel``,
``mask_eroded`` (False: erosion would have emptied the mask, which is then kept as it is), ``conditioning_mask`` and
``eroded_from``, with ``source`` and
``background`` made relative to the new folder, and the source's ``provenance.json``. The source folder is
never modified; the new one is built complete and swapped in (``ldm.fileio.replace_dir``). A folder whose masks are
already eroded is refused (erode its source).
"""

from __future__ import annotations

import json
from pathlib import Path

from ldm.fileio import replace_dir, write_text_atomic

from siamese.data.images import write_png
from siamese.data.masks import erode_mask, mask_erodes, mask_to_png, read_mask
from siamese.data.pairs import (
    CONDITIONING_DIR,
    IMAGES_DIR,
    MANIFEST_NAME,
    MASKS_DIR,
    complete_records,
    copy_provenance,
    link_or_copy,
    rebased_record,
)

__all__ = ["erode_folder"]


def erode_folder(src: Path, out: Path, pixels: int, kernel: str) -> dict[str, int]:
    """Write ``out`` from ``src`` with every mask eroded; returns counts (pairs, eroded, kept)."""
    records = complete_records(src)
    done = [n for n, r in records.items() if int(r.get("erode", 0) or 0) > 0]
    if done:
        raise ValueError(f"{src}: pair {done[0]} is already eroded by {records[done[0]]['erode']} px; erode its "
                         "source folder instead")
    counts = {"pairs": 0, "eroded": 0, "kept": 0}
    with replace_dir(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        (tmp / MASKS_DIR).mkdir()
        (tmp / CONDITIONING_DIR).mkdir()
        lines = []
        for record in records.values():
            mask01 = read_mask(src / record["mask"], threshold=127)
            changed = mask_erodes(mask01, pixels, kernel)
            write_png(tmp / record["mask"], mask_to_png(erode_mask(mask01, pixels, kernel)))
            link_or_copy(src / record["image"], tmp / record["image"])
            conditioning = f"{CONDITIONING_DIR}/{Path(record['mask']).name}"
            link_or_copy(src / record["mask"], tmp / conditioning)
            lines.append(json.dumps({**rebased_record(record, src, out), "erode": pixels, "erode_kernel": kernel,
                                     "mask_eroded": changed, "conditioning_mask": conditioning,
                                     "eroded_from": str(src)}))
            counts["pairs"] += 1
            counts["eroded" if changed else "kept"] += 1
        write_text_atomic(tmp / MANIFEST_NAME, "".join(line + "\n" for line in lines))
        copy_provenance(src, tmp)  # eroded masks of the same pairs: made from the same models and data
    return counts
