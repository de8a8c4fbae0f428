"""Progress of long loops when the output is a log file: a few log lines, not carriage-return updates."""

from __future__ import annotations

import logging

from ldm.progress import progress


def test_off_a_terminal_progress_is_one_log_line_per_twentieth(caplog):
    caplog.set_level(logging.INFO, logger="siamese.progress")
    assert list(progress(range(100), desc="sampling", unit="pair", interactive=False)) == list(range(100))
    lines = [r.getMessage() for r in caplog.records if r.name == "siamese.progress"]
    assert len(lines) == 20 and lines[0].startswith("sampling: 5/100 pair") and "s left" in lines[0]
    assert lines[-1].startswith("sampling: 100/100 pair") and "left" not in lines[-1]


def test_short_loops_unknown_totals_and_disabled_progress(caplog):
    caplog.set_level(logging.INFO, logger="siamese.progress")
    assert list(progress(range(3), desc="x", interactive=False, lines=20)) == [0, 1, 2]
    assert len([r for r in caplog.records if r.name == "siamese.progress"]) == 3  # every item, the last included
    caplog.clear()
    assert list(progress(iter(range(120)), desc="y", interactive=False)) == list(range(120))
    assert [r.getMessage().split(" ")[1] for r in caplog.records] == ["50", "100"]  # no total: every 50
    caplog.clear()
    items = [1, 2]
    assert progress(items, disable=True) is items and not caplog.records
