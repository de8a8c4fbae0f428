"""``python -m tools.compare_generators``: which generator is worth its cost, and does its data help at all?

    python -m tools.compare_generators --real split --out eval/compare \\
        --generator siamese=synth/siamese_s0,synth/siamese_s1 --generator controlnet=synth/cn_s0,synth/cn_s1 \\
        --arms real,real+synthetic,synthetic,pretrain-finetune --synthetic-ratio 0.25,0.5,1 --seeds 3
    python -m tools.compare_generators ... --filtered siamese=synth/siamese_s0_f,synth/siamese_s1_f \\
        --filtered controlnet=synth/cn_s0_f,synth/cn_s1_f --features first_stage --feature-weights base.safetensors

Each --generator is a NAME and two or more sampling folders (tutorial_inference.py outputs, with provenance.json)
from independently seeded trainings of that generator; --real the python -m tools.split output whose train/ side
they trained on. Every folder passes the benchmark's checks first (provenance leak check, colliding stems, the
filtered folders being subsets of their sources). Then, per generator, aggregated across its seeds: mask fidelity
(the real-data segmenter on each generated image vs its conditioning mask; --colour-rule adds the generated demo
domain's colour rule), FID / KID per folder against as many real training images (with --features / --inception;
else skipped, and the report says so), downstream mDice per schedule (real only, once, as every generator's
baseline; real + synthetic at each --synthetic-ratio; synthetic only; pretrain-finetune: --pretrain-share of the
--seg-steps budget on the synthetic pairs, the rest on the real ones; each synthetic schedule again on the
--filtered folders' pairs) as mean ± std over generator seeds × segmenter seeds with both spreads apart, and the
training cost in CPU / GPU hours from each training run's cost.jsonl (found through the folder's provenance).
Writes OUT/comparison.md (tables and the plain verdict: the best generator, and whether real + synthetic beats real
only beyond the spread, "no gain" when it does not), OUT/comparison.json and OUT/comparison.png; the segmenter runs
go to OUT/benchmark/ (results.csv per folder, keyed by inputs: a re-run resumes, changed inputs recompute).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ldm.fileio import write_json_atomic

from siamese.evaluation.report import write_markdown
from tools._cli import make_parser, run
from tools.evaluate import add_tower_args, feature_extractor
from tools.segmentation_benchmark import add_benchmark_args, benchmark_config

if TYPE_CHECKING:
    from siamese.evaluation.compare import Generator

# torch-backed modules are imported in the functions that use them: --help stays fast
logger = logging.getLogger("siamese.compare_generators")
ALL_ARMS = "real,real+synthetic,synthetic,pretrain-finetune"


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tools.compare_generators", __doc__)
    p.add_argument("--real", type=Path, required=True, help="the real data: a python -m tools.split output")
    p.add_argument("--generator", action="append", required=True, metavar="NAME=FOLDER,FOLDER[,...]",
                   help="a generator and its sampling folders, one per training seed (≥ 2; repeatable)")
    p.add_argument("--filtered", action="append", default=[], metavar="NAME=FOLDER,FOLDER[,...]",
                   help="tools.filter_pairs outputs of that generator's folders, in the same order: filtered vs all")
    p.add_argument("--out", type=Path, required=True, help="output folder (comparison.md/.json/.png, benchmark/)")
    q = add_tower_args(p)
    q.add_argument("--colour-rule", action="store_true",
                   help="also score mask fidelity with the colour rule of the generated demo domain")
    add_benchmark_args(p)
    p.set_defaults(arms=ALL_ARMS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p


def generators(args: argparse.Namespace) -> list[Generator]:
    from siamese.evaluation.compare import Generator, parse_named_folders

    named = [parse_named_folders(text, "--generator") for text in args.generator]
    filtered = dict(parse_named_folders(text, "--filtered") for text in args.filtered)
    unknown = set(filtered) - {name for name, _ in named}
    if unknown:
        raise ValueError(f"--filtered names {sorted(unknown)}, which no --generator has")
    return [Generator(name, folders, filtered.get(name, ())) for name, folders in named]


def _body(args: argparse.Namespace) -> int:
    from siamese.evaluation.compare import compare_generators, comparison_markdown, comparison_plot

    start = time.perf_counter()
    if args.inception and args.features:
        raise ValueError("pass --inception or --features, not both")
    gens = generators(args)
    cfg = benchmark_config(args)
    extractor, features = feature_extractor(args)  # a bad weights file fails now, before any segmenter trains
    result = compare_generators(args.real, gens, args.out, cfg, extractor=extractor, features=features,
                                fid_count=args.fid_count, colour=args.colour_rule, device=args.device,
                                progress=not args.no_progress, allow_generator_leak=args.allow_generator_leak)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    comparison_plot(result, args.out / "comparison.png")
    write_json_atomic(args.out / "comparison.json", result, indent=1, default=str)
    write_markdown(args.out / "comparison.md", comparison_markdown(result))
    logger.info("%s\n\ncomparison: %s (%.0f s)", "\n".join(result["verdict"]), args.out / "comparison.md",
                result["seconds"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
