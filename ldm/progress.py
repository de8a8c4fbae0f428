"""Progress over long loops (sampling, scoring, feature extraction, segmenter training, dataset checks).

On a terminal: a tqdm bar. When stderr is not a terminal (a log file, CI, ``nohup``, a SLURM job): no bar, since
tqdm would write thousands of carriage-return updates into the file, but one log line every ``total / lines`` items
(and at the last) with the count, the rate and the time left, as ``cldm.callbacks.StepProgressBar`` does for
training. Imports only the standard library and tqdm.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger("siamese.progress")


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False, leave: bool = True, lines: int = 20,
             interactive: bool | None = None) -> Iterable[T]:
    """``iterable`` with progress shown as described above; ``interactive`` None: whether stderr is a terminal."""
    if disable:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if sys.stderr.isatty() if interactive is None else interactive:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave)
    return _logged(iterable, total, desc, unit, max(1, int(lines)))


def _logged(iterable: Iterable[T], total: int | None, desc: str, unit: str, lines: int) -> Iterator[T]:
    every = max(1, total // lines) if total else 50
    start = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        if done % every == 0 or done == total:
            elapsed = time.monotonic() - start
            rate = done / elapsed if elapsed > 0 else float("inf")
            left = f", {(total - done) / rate:.0f} s left" if total and rate > 0 and done < total else ""
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s %s (%.2f %s/s%s)", desc or "progress", done, of, unit, rate, unit, left)
