"""Siamese-Diffusion and the systems around it, in rooms that name their concern.

- ``siamese`` itself: the paper's method and its run: ``losses`` (the four terms), ``schedules`` (ramp and gate),
  ``model`` (the copy-free twin-branch loss), ``reference`` (the deep-copy formulation, for parity), ``lightning``,
  ``config`` (the schema), ``factory`` (the one place a config becomes objects), ``run_dir`` and ``sampling``
  (image-mask pairs from masks).
- ``siamese.data``: files and datasets: the ``prompt.json`` layout, image and mask I/O, datasets, the procedural demo
  data, the dataset check, preparation and the pair records and files that sampling writes.
- ``siamese.evaluation``: does the synthetic data help? Segmenter, metrics, fidelity, FID/KID, memorisation,
  benchmark, reports.
- ``siamese.meddiff``: MedDiff-FT (mask generator, background repair, quality filter, mask erosion of a pairs
  folder); room is left beside it for the next model families (``volumes``, ``segdiff``).

Imports flow one way: ``data`` ← method ← ``evaluation`` ← ``meddiff`` (each may import the rooms to its left, and
``ldm``/``cldm``); nothing in ``siamese`` imports ``tools``. ``tests/test_import_direction.py`` checks it.
"""

from ldm import _compat  # noqa: F401  (torchvision shim on CPU-only installs; must run first)

from siamese import _moved

_moved.install()
