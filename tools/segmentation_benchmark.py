"""``python -m tools.segmentation_benchmark``: does the synthetic data improve a segmenter trained on the real data?

    python -m tools.segmentation_benchmark --real data/polyps --synthetic synth/real --out eval/seg --seeds 3
    python -m tools.segmentation_benchmark --real data/polyps --synthetic synth/real --synthetic synth/random \\
        --out eval/seg --synthetic-ratio 0.5,1,2 --network smp_unet
    python -m tools.segmentation_benchmark --real split --synthetic synth/real --filtered synth/real_filtered \\
        --out eval/seg --arms real,real+synthetic,synthetic,pretrain-finetune --synthetic-ratio 0.25,0.5,1

Trains a segmenter (MONAI BasicUNet by default; randomly initialised, nothing downloads) per arm and seed: the real
training split alone, real + synthetic at each ratio (the ratio sweep: one row per ratio and seed), synthetic alone,
and with --arms ...,pretrain-finetune: pretrained on the synthetic pairs, then fine-tuned on the real ones, within
the same optimiser budget as every arm (--seg-steps: --pretrain-share of them on the synthetic pairs, the rest on
the real; the table states both). --filtered FOLDER (a python -m tools.filter_pairs output of the --synthetic
folders' pairs) runs every synthetic arm a second time on the kept pairs only: filtered vs all, one row each.
Scores mDice / mIoU on the held-out real test split. --real is best a python -m tools.split output, whose train/
side trained the generators; a plain dataset is split into OUT/splits.json (seeded; --group-regex keeps a patient's
images on one side) and reused. Two images or masks of one folder whose stems collide (a.png, a.jpg) are refused, as
is one synthetic image given twice. Each synthetic folder's provenance is followed to the data its models trained
on: one that saw a test image is refused (unless --allow-generator-leak, which the report then states at its top);
pairs generated from test masks are excluded. OUT/results.csv gets one row per run as it finishes, keyed by its
schedule, the digests of its inputs and its settings (re-run the command to resume; changed data, schedule or
settings recompute); OUT/report.md and OUT/benchmark.png show mean ± std.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from siamese.evaluation.report import arm_label, benchmark_plot, benchmark_table, write_markdown
from siamese.evaluation.settings import NETWORKS, BenchmarkConfig, SegmenterConfig
from tools._cli import make_parser, run

# torch-backed modules are imported in the functions that use them: --help stays fast
logger = logging.getLogger("siamese.segmentation_benchmark")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"ratios must be > 0, got {text!r}")
    return values


def add_benchmark_args(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared with ``tools.evaluate``)."""
    g = p.add_argument_group("downstream benchmark")
    g.add_argument("--seeds", type=int, default=3, help="segmenter seeds per arm (default 3)")
    g.add_argument("--synthetic-ratio", type=_ratios, default=(1.0,), metavar="R[,R...]",
                   help="synthetic pairs per real training pair in the real+synthetic arm (default 1)")
    g.add_argument("--arms", default="real,real+synthetic,synthetic",
                   help="which schedules to run, of real, real+synthetic, synthetic, pretrain-finetune (default "
                        "real,real+synthetic,synthetic)")
    g.add_argument("--pretrain-share", type=float, default=0.5,
                   help="pretrain-finetune: share of --seg-steps spent on the synthetic pairs before fine-tuning on "
                        "the real ones (default 0.5: 150 + 150 of 300)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="share of the real pairs held out (0.2)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the split and the synthetic order (0)")
    g.add_argument("--group-regex", help="regex whose first group is the patient id: a patient's images stay on "
                                         "one side of the split")
    g.add_argument("--network", choices=NETWORKS, default="basic_unet", help="segmenter (default basic_unet)")
    g.add_argument("--resolution", type=int, default=128, help="segmenter input size (default 128)")
    g.add_argument("--seg-steps", type=int, default=300, help="segmenter training steps (default 300)")
    g.add_argument("--seg-batch", type=int, default=8, help="segmenter batch size (default 8)")
    g.add_argument("--intensity", default="auto", metavar="MODE",
                   help="how 16-bit / float real images become 8 bit: auto, full_range, minmax, "
                        "percentile[:LOW,HIGH]; use the data.intensity the generators were trained with (auto)")
    g.add_argument("--device", default="cpu", help="torch device for the segmenter (default cpu)")
    g.add_argument("--allow-generator-leak", action="store_true",
                   help="accept synthetic folders whose models saw test images, or that carry no provenance (the "
                        "report then says so at its top); without it they are refused")


def benchmark_config(args: argparse.Namespace) -> BenchmarkConfig:
    segmenter = SegmenterConfig(network=args.network, resolution=args.resolution, steps=args.seg_steps,
                                batch_size=args.seg_batch)
    return BenchmarkConfig(seeds=args.seeds, ratios=args.synthetic_ratio,
                           arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
                           test_fraction=args.test_fraction, split_seed=args.split_seed,
                           group_regex=args.group_regex, segmenter=segmenter, pretrain_share=args.pretrain_share,
                           intensity=args.intensity)


def leak_lines(inputs) -> list[str]:
    """The report's opening lines about what the leak check accepted or found (empty when clean)."""
    lines = [f"> **{w}**" if w.startswith("ACCEPTED LEAK") else f"> {w}" for w in inputs.warnings]
    if inputs.excluded_test_masks:
        lines.append(f"> {inputs.excluded_test_masks} synthetic pairs generated from test masks were excluded.")
    return [*lines, ""] if lines else []


def split_line(inputs) -> str:
    split = inputs.split
    return f"Split: {len(split.train)} train / {len(split.test)} test real pairs, from {split.origin}."


def shown(summary: list[dict]) -> list[dict]:
    """Summary rows as the report labels them: the pool (filtered pairs) and pretrain-finetune's two phases named."""
    out = []
    for row in summary:
        label = arm_label(row)
        if row["arm"] == "pretrain-finetune":
            label += f" ({row['steps']} steps)"
        if row.get("pool") == "filtered":
            label += " (filtered pairs)"
        out.append({**row, "arm": label})
    return out


def benchmark_report(rows: list[dict], out: Path) -> list[str]:
    """Write OUT/benchmark.png; return the markdown lines of the table."""
    from siamese.evaluation.benchmark import summarise_results

    summary = shown(summarise_results(rows))
    benchmark_plot(summary, out / "benchmark.png")
    return benchmark_table(summary)


def _body(args: argparse.Namespace) -> int:
    from siamese.evaluation.benchmark import prepare_inputs, run_benchmark

    start = time.perf_counter()
    cfg = benchmark_config(args)
    inputs = prepare_inputs(args.real, args.synthetic, args.out, cfg, allow_generator_leak=args.allow_generator_leak,
                            filtered=args.filtered)
    rows = run_benchmark(args.real, args.synthetic, args.out, cfg, device=args.device, progress=not args.no_progress,
                         inputs=inputs, filtered=args.filtered)
    table = benchmark_report(rows, args.out)
    lines = ["# Downstream segmentation benchmark", "", *leak_lines(inputs),
             f"Real data: `{args.real}`; synthetic: {', '.join(f'`{s}`' for s in args.synthetic) or 'none'}"
             + (f" (filtered: {', '.join(f'`{s}`' for s in args.filtered)})" if args.filtered else "") + ". "
             f"Segmenter: {cfg.segmenter.network}, {cfg.segmenter.steps} steps, batch {cfg.segmenter.batch_size}, "
             f"{cfg.segmenter.resolution}² inputs; scored on the held-out real test split. {split_line(inputs)}", "",
             *table, "", "![benchmark](benchmark.png)", ""]
    write_markdown(args.out / "report.md", lines)
    logger.info("%s\n\nreport: %s (%.0f s)", "\n".join(table), args.out / "report.md", time.perf_counter() - start)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = make_parser("python -m tools.segmentation_benchmark", __doc__)
    p.add_argument("--real", type=Path, required=True,
                   help="the real data: a python -m tools.split output (scored on its test/), or a dataset "
                        "(prompt.json layout) split here into OUT/splits.json")
    p.add_argument("--synthetic", type=Path, action="append", default=[],
                   help="a tutorial_inference.py output folder (repeatable)")
    p.add_argument("--filtered", type=Path, action="append", default=[],
                   help="a python -m tools.filter_pairs output of the --synthetic folders' pairs (repeatable): the "
                        "synthetic arms run again on its pairs only (filtered vs all)")
    p.add_argument("--out", type=Path, required=True, help="output folder (splits, results, report)")
    add_benchmark_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return run(_body, p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
