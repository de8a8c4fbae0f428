"""``python -m tools.split``: split a real dataset first, so that no test image reaches any model.

    python -m tools.split data/polyps --out data/polyps_split                     # 20 % test, seed 0
    python -m tools.split data/polyps --out data/polyps_split --test-fraction 0.3 --group-regex '^(p\\d+)_'

Writes OUT/train and OUT/test, two datasets in the training layout (images/, masks/, prompt.json; files hard-linked,
or copied across file systems, never moved) and OUT/splits.json (the names of each side with every file's digest,
the seed and the settings). Train every generative model (tutorial_train.py data.root=OUT/train, tools.pretrain,
tools.maskgen, tools.repair_backgrounds) on OUT/train only; give OUT itself to tools.evaluate and
tools.segmentation_benchmark as --real: they score on OUT/test and refuse synthetic data whose models saw it.
Re-running with the same data and settings keeps OUT; anything else in OUT is refused unless --force.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from siamese.data.split import write_split_dataset
from tools._cli import make_parser, run

logger = logging.getLogger("siamese.split")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tools.split", __doc__)
    p.add_argument("data", type=Path, help="the real dataset (a folder with prompt.json, or the prompt.json file)")
    p.add_argument("--out", type=Path, required=True, help="output folder (train/, test/, splits.json)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of pairs (or patients) held out (0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (0)")
    p.add_argument("--group-regex", help="regex whose first group (or whole match) is the patient id in the mask's "
                                         "file stem: a patient's images stay on one side")
    p.add_argument("--force", action="store_true", help="replace an OUT that holds something else")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p


def _body(args: argparse.Namespace) -> int:
    record = write_split_dataset(args.data, args.out, test_fraction=args.test_fraction, seed=args.seed,
                                 group_regex=args.group_regex, force=args.force)
    logger.info("%s: %d train / %d test pairs (seed %d, test fraction %g%s) → %s/train, %s/test",
                args.data, len(record["train"]), len(record["test"]), args.seed, args.test_fraction,
                f", groups by {args.group_regex!r}" if args.group_regex else "", args.out, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
