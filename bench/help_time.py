"""How long every command-line tool takes to print ``--help`` (a fresh interpreter each, so imports count), and
which heavy packages it imported. The target is ≤ 1 s; on a loaded 2-core machine the numbers vary by tens of
percent, so compare tools within one run.

    python bench/help_time.py            # all tools, 3 runs each, the median
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOT_SCRIPTS = ("tutorial_train.py", "tutorial_inference.py", "tool_add_control.py", "tool_merge_control.py",
                "zero_to_fp32.py")
HEAVY = ("torch", "open_clip", "torchvision", "pytorch_lightning", "deepspeed", "monai", "timm")


def commands() -> list[tuple[str, list[str]]]:
    tools = sorted(p.stem for p in (REPO / "tools").glob("*.py")
                   if not p.stem.startswith("_") and "\ndef main(" in p.read_text())
    return ([(name, [sys.executable, name]) for name in ROOT_SCRIPTS]
            + [(f"-m tools.{name}", [sys.executable, "-m", f"tools.{name}"]) for name in tools])


def probe(argv: list[str]) -> str:
    """The heavy packages a command imports on --help (via ``-X importtime``)."""
    err = subprocess.run([argv[0], "-X", "importtime", *argv[1:], "--help"], cwd=REPO, capture_output=True,
                         text=True).stderr
    seen = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")}
    return ",".join(name for name in HEAVY if name in seen) or "-"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{'command':36} {'median s':>9}  heavy imports")
    for name, command in commands():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            done = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True)
            times.append(time.perf_counter() - start)
            if done.returncode != 0:
                print(f"{name:36} FAILED rc={done.returncode}")
                break
        else:
            print(f"{name:36} {statistics.median(times):9.2f}  {probe(command)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
