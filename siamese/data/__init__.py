"""Files and datasets: what is on disk and how it is read, with no model in sight.

- ``layout``: the ``prompt.json`` layout (``{"source": mask, "target": image, "prompt": text}`` lines).
- ``images``: image decoding, 8-bit RGB conversion, header sizes, the one resize rule, atomic PNG writes.
- ``masks``: mask reading and binarisation, resizing, erosion, augmentation.
- ``datasets``: the training datasets (mask-image pairs, plain images, procedural pairs).
- ``synthetic``: the procedural lesion generator of tests and the demo.
- ``check`` and ``findings``: ``tools.doctor``'s whole-dataset check; ``prepare``: ``tools.prepare_data``.
- ``pairs``: the pair records sampling produces and the pairs folder it writes (manifest, resume, grid).

The lowest room of ``siamese``: may import ``ldm`` (its file helpers) and nothing else of the project.
The names the former module ``siamese.data`` held are still importable from here (with a DeprecationWarning).
"""

from __future__ import annotations

import importlib
import warnings

_FORMER = {
    "PROMPT_FILE": "layout", "DEFAULT_PROMPT": "layout", "PairRecord": "layout", "parse_prompt_line": "layout",
    "read_prompt_jsonl": "layout", "resolve_record_path": "layout",
    "IMAGE_SUFFIXES": "images", "aspect_ratios_differ": "images", "decode_image": "images", "header_size": "images",
    "image_to_rgb8": "images", "read_image_rgb": "images",
    "ImageDataset": "datasets", "MaskImageDataset": "datasets", "SyntheticLesionDataset": "datasets",
    "make_sample": "datasets", "MASK_RULE_PROBE": "datasets",
    "synthetic_pair": "synthetic", "write_synthetic_dataset": "synthetic",
}


def __getattr__(name: str) -> object:
    room = _FORMER.get(name)
    if room is None:
        raise AttributeError(f"module 'siamese.data' has no attribute {name!r}")
    warnings.warn(f"siamese.data.{name} moved to siamese.data.{room}.{name}; import it from there (CHANGELOG.md)",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(f"siamese.data.{room}"), name)
