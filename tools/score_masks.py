"""Score predicted segmentation masks against ground truth: Dice, IoU, precision, recall and HD95 per image.

    python -m tools.score_masks preds/ data/kvasir/test/masks --out results.csv
    python -m tools.score_masks probs/ gt/ --pred-suffix _pred --threshold 0.5
    python -m tools.score_masks probs/ gt/ --sweep --out sweep.csv      # GuidedDiff: mean over 0.1 … 0.9

Files are paired by stem (extensions may differ), after stripping --pred-suffix from prediction names (x_pred.png ↔
x.png) and --gt-suffix from ground-truth names (ISIC: _segmentation). Ground truth is read like training masks
(0/255 and 0/1 label masks both work; gray > 127 otherwise). Predictions are read as gray levels (8 bit ÷ 255,
16 bit ÷ 65535): by default they must be binary (0 and one other value), --threshold T binarises probability maps
as value > T, --sweep averages every metric over T = 0.1, 0.2, …, 0.9. The table gives per-metric mean ± std over
images; HD95 (pixels, MONAI's symmetric 95th-percentile definition) is undefined where exactly one of the two masks
is empty: those images are counted and left out of its mean. Two empty masks score 1 (HD95 0). --out writes the
per-image CSV (name, dice, iou, precision, recall, hd95; undefined HD95 as nan) and a .json summary beside it.
See siamese/evaluation/metrics.py for the definitions.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import sys
from pathlib import Path

from ldm.fileio import write_text_atomic

from siamese.config import ConfigError
from siamese.evaluation.metrics import METRICS, SWEEP_THRESHOLDS, MaskScores, format_summary, summarize
from siamese.evaluation.scoring import pair_masks, score_mask_pairs
from tools._cli import make_parser, run

logger = logging.getLogger("siamese.tools.score_masks")


def _outputs(out: Path | None, force: bool) -> tuple[Path, Path] | None:
    """(CSV, JSON) paths, checked before any scoring: a .csv name, nothing replaced without --force."""
    if out is None:
        return None
    if out.suffix.lower() != ".csv":
        raise ConfigError(f"--out {out}: give a .csv file name (the JSON summary is written beside it)")
    summary = out.with_suffix(".json")
    for path in (out, summary):
        if path.is_dir():
            raise IsADirectoryError(f"output {path} is a directory; give a file name")
        if path.exists() and not force:
            raise FileExistsError(f"output {path} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {out}: directory {out.parent} is not writable")
    return out, summary




def _csv_text(rows: list[tuple[str, MaskScores]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", *METRICS])
    for name, scores in rows:
        writer.writerow([name, *(repr(float(getattr(scores, m))) for m in METRICS)])
    return buffer.getvalue()


def _body(args: argparse.Namespace) -> int:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # NaN fails too
        raise ConfigError(f"--threshold {args.threshold} must lie in [0, 1] (predictions are read as [0, 1])")
    outputs = _outputs(args.out, args.force)
    threshold = SWEEP_THRESHOLDS if args.sweep else args.threshold
    mode = "sweep" if args.sweep else "binary" if threshold is None else "threshold"

    pairing = pair_masks(args.pred_dir, args.gt_dir, args.pred_suffix, args.gt_suffix)
    mismatch = pairing.mismatch()
    hint = "names pair by stem; --pred-suffix / --gt-suffix strip a name suffix"
    if not pairing.pairs:
        raise ValueError(f"no prediction matches a ground-truth mask: {mismatch} ({hint})")
    if mismatch and not args.allow_missing:
        raise ValueError(f"prediction and ground-truth names differ: {mismatch} ({hint}); pass --allow-missing to "
                         f"score the {len(pairing.pairs)} matching pair(s)")
    if mismatch:
        logger.warning("scoring only the matching pairs: %s", mismatch)

    rows = score_mask_pairs(pairing.pairs, threshold, resize=args.resize, progress=False if args.no_progress else None)
    summary = summarize(scores for _, scores in rows)
    how = ("binary predictions" if mode == "binary" else "mean over thresholds 0.1 … 0.9" if mode == "sweep"
           else f"probability > {args.threshold:g}")
    sys.stdout.write(f"{len(rows)} images, {how}\n{format_summary(summary)}")

    if outputs is not None:
        csv_path, json_path = outputs
        report = {
            "pred_dir": str(args.pred_dir), "gt_dir": str(args.gt_dir), "images": len(rows), "mode": mode,
            "thresholds": None if threshold is None else list(SWEEP_THRESHOLDS if args.sweep else [threshold]),
            "binarisation": None if threshold is None else "probability > threshold",
            "predictions_without_gt": len(pairing.preds_without_gt),
            "gt_without_prediction": len(pairing.gts_without_pred),
            "hd95": "pixels; max of the two directed 95th percentiles of surface distances (MONAI); null/nan = "
                    "undefined (exactly one mask empty), left out of the mean",
            "metrics": {name: summary[name].as_dict() for name in METRICS},
        }
        write_text_atomic(json_path, json.dumps(report, indent=2, allow_nan=False) + "\n")
        write_text_atomic(csv_path, _csv_text(rows))
        logger.info("wrote %s and %s", csv_path, json_path)
    undefined = summary["hd95"].undefined
    if undefined:
        logger.info("HD95 undefined for %d image(s) (exactly one mask empty): left out of its mean", undefined)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m tools.score_masks", __doc__)
    p.add_argument("pred_dir", type=Path, help="folder of predicted masks or probability maps")
    p.add_argument("gt_dir", type=Path, help="folder of ground-truth masks")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--threshold", type=float, metavar="T",
                      help="binarise probability maps as value > T (T in [0, 1])")
    mode.add_argument("--sweep", action="store_true",
                      help="average every metric over the thresholds 0.1, 0.2, …, 0.9 (GuidedDiff's protocol)")
    p.add_argument("--pred-suffix", default="", metavar="S", help="strip S from prediction names (e.g. _pred)")
    p.add_argument("--gt-suffix", default="", metavar="S", help="strip S from ground-truth names (e.g. _segmentation)")
    p.add_argument("--allow-missing", action="store_true",
                   help="score the matching pairs when some files have no partner (warning) instead of failing")
    p.add_argument("--resize", action="store_true",
                   help="resize predictions to their ground truth's size (nearest for binary masks, area/linear for "
                        "probability maps) instead of failing")
    p.add_argument("--out", type=Path, metavar="CSV", help="per-image CSV; a .json summary is written beside it")
    p.add_argument("--force", action="store_true", help="overwrite existing --out files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
