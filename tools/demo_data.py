"""Write the built-in generated lesion pairs to disk in the training layout (images/, masks/, prompt.json).

    python -m tools.demo_data data/demo --samples 32 --resolution 64

For trying the whole workflow without medical data: train on the folder (``data.root=data/demo``) and sample
from its masks. The pairs are the ones the tiny config generates in memory when ``data.root`` is null.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from siamese.data.layout import PROMPT_FILE
from siamese.data.synthetic import write_synthetic_dataset
from tools._cli import make_parser, run


def _body(args: argparse.Namespace) -> int:
    if (args.out / PROMPT_FILE).exists() and not args.force:
        raise FileExistsError(f"{args.out / PROMPT_FILE} already exists: pass --force to replace it")
    write_synthetic_dataset(args.out, args.samples, args.resolution, args.seed, overwrite=args.force)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m tools.demo_data", __doc__)
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--samples", type=int, default=32, help="number of pairs (default 32)")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64, the tiny config)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing prompt.json")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
