"""Time the main job: ``python -m tools.demo`` from scratch in a fresh folder, as a user runs it (2-core CPU budget:
≤ 10 minutes). Prints the wall time, the peak memory of the demo process, and the demo's own per-stage timings.

    python bench/demo_time.py                    # a temporary folder, removed afterwards
    python bench/demo_time.py --keep runs/demo_t # keep the output (report.md, grid.png) to look at it

Machine noise moves the wall time by tens of seconds: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, help="write the demo here and keep it (default: a temporary folder)")
    p.add_argument("demo_args", nargs="*", help="extra arguments for python -m tools.demo (after --)")
    args = p.parse_args(argv)
    out = args.keep or Path(tempfile.mkdtemp(prefix="demo_time_")) / "demo"
    start = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "tools.demo", "--out", str(out), "--force", *args.demo_args],
                           cwd=REPO)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if code:
        print(f"demo failed with exit code {code}", file=sys.stderr)
        return code
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    fidelity = report["fidelity"]
    print(f"demo wall time {wall / 60:.0f} min {wall % 60:02.0f} s ({wall:.0f} s; budget 600 s: "
          f"{'within' if wall <= 600 else 'OVER'}), peak RSS {peak / 1024:.2f} GiB")
    print("mask fidelity (Dice, real masks): " + ", ".join(
        f"{model} {by_mode['real']['mean']:.3f}" for model, by_mode in fidelity.items()))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["stage_seconds"].items()))
    if args.keep is None:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
