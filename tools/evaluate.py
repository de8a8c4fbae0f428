"""``python -m tools.evaluate``: does the synthetic data help? One command, one report.

    python -m tools.evaluate --real data/polyps --synthetic synth/real --synthetic synth/random --out eval/
    python -m tools.evaluate --real data/polyps --synthetic synth/real --out eval/ \\
        --inception weights-inception-2015-12-05-6726825d.pth --seeds 3 --synthetic-ratio 0.5,1,2
    python -m tools.evaluate --real data/polyps --synthetic synth/real --out eval/ \\
        --features timm:resnet50 --feature-weights resnet50_medical.safetensors

Give --real the python -m tools.split output whose train/ side trained the generators. First, before anything is
written, each synthetic folder's provenance is followed to the data its models trained on: a folder whose generator,
mask generator or background library saw a test image is refused (--allow-generator-leak accepts it, and the report
says so at its top); pairs generated from test masks are excluded; near-duplicate train/test images are reported.
Then it runs what applies, each part on its own library (siamese.evaluation):
1. downstream benchmark (tools.segmentation_benchmark): segmenters on real / real + synthetic / synthetic, scored on
   the held-out real test split, mean ± std over seeds (skip with --no-benchmark);
2. mask fidelity: the benchmark's real-data segmenter (seed 0) segments every generated image; Dice against the mask
   it was conditioned on (for eroded labels the recorded conditioning mask, with the Dice against the eroded label
   beside it), per pair in OUT/fidelity/<run>.jsonl and overall;
3. image quality: FID and KID between the real training images and an equal number of synthetic ones (the paper's
   protocol), with the Inception weights from a local file (--inception) or any local image tower (--features);
   without either, this part is skipped and the report says which file it needs;
4. diversity among the samples of one mask (pixel RMSE; feature cosine with an extractor), when a mask has several;
5. memorisation: each synthetic image's nearest real image, training and test split searched (pixels; features with
   an extractor), near-copies flagged where closer than any two distinct real images are (thresholds calibrated per
   tower on the real images; --copy-*-threshold sets them), copies of test images counted apart, the closest pairs
   in OUT/memorisation.png.
Writes OUT/report.md, OUT/report.json and the PNGs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

from ldm.fileio import write_json_atomic, write_text_atomic

import numpy as np

from siamese.evaluation.report import benchmark_plot, benchmark_table, write_markdown
from siamese.evaluation.settings import INCEPTION_WEIGHTS_FILE
from tools._cli import make_parser, run
from tools.segmentation_benchmark import add_benchmark_args, benchmark_config, leak_lines, split_line

# torch-backed modules are imported in the functions that use them: --help stays fast
logger = logging.getLogger("siamese.evaluate")


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _fidelity(args: argparse.Namespace, cfg, out: Path, inputs) -> dict:
    from siamese.evaluation.benchmark import load_pairs, segmenter_key
    from siamese.evaluation.fidelity import score_pairs, segmenter_rule
    from siamese.evaluation.segmenter import load_segmenter, save_segmenter, segmenter_trained_on, train_segmenter

    """Mask fidelity of each synthetic run with the real-data segmenter (the benchmark's when it was trained on these
    very inputs, else trained here)."""
    path = out / "segmenter_real_seed0.safetensors"
    key = segmenter_key(inputs.train_digests, cfg.segmenter, 0, cfg.intensity)
    if segmenter_trained_on(path) == key:
        model, seg_cfg = load_segmenter(path, args.device)
    else:
        if path.is_file():
            logger.info("%s was trained on other inputs or settings: training it again", path)
        seg_cfg = cfg.segmenter
        model = train_segmenter(load_pairs(inputs.split.train, cfg.intensity), seg_cfg, seed=0, device=args.device,
                                progress=not args.no_progress, desc="fidelity segmenter")
        save_segmenter(model, seg_cfg, path, trained_on=key)
    segment = segmenter_rule(model, seg_cfg, args.device)
    results = {}
    (out / "fidelity").mkdir(exist_ok=True)
    for folder in args.synthetic:
        scores = score_pairs(folder, segment)
        lines = [json.dumps({"name": s.name, "dice": round(s.dice, 5), "mask_area": round(s.mask_area, 5),
                             **({} if s.label_dice is None else {"label_dice": round(s.label_dice, 5)})})
                 for s in scores]
        target = out / "fidelity" / f"{run_label(folder, args.synthetic)}.jsonl"
        write_text_atomic(target, "\n".join(lines) + "\n")
        dice = np.array([s.dice for s in scores])
        results[str(folder)] = {"pairs": len(scores), "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
                                "dice_median": float(np.median(dice)), "share_ge_0.7": float((dice >= 0.7).mean()),
                                "per_pair": str(target)}
        labels = [s.label_dice for s in scores if s.label_dice is not None]
        if labels:  # eroded labels: the Dice above is against the conditioning masks, this one against the labels
            results[str(folder)]["label_dice_mean"] = float(np.mean(labels))
    return results


def run_label(folder: Path, folders: list[Path]) -> str:
    """A file name unique among ``folders``: the folder's path below their common parent, ``/`` as ``__``
    (``synth/siamese/real`` and ``synth/controlnet/real`` → ``siamese__real``, ``controlnet__real``)."""
    resolved = [Path(f).resolve() for f in folders]
    single = Path(folder).resolve().parent
    common = Path(os.path.commonpath([str(f) for f in resolved])) if len(resolved) > 1 else single
    return "__".join(Path(folder).resolve().relative_to(common).parts) or Path(folder).name


def add_tower_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The image-quality options shared by the evaluation tools: the feature tower (from a local file) and the
    images per side of FID/KID. Returns the group, for a tool's own quality options."""
    q = parser.add_argument_group("image quality")
    q.add_argument("--inception", type=Path, help=f"local FID Inception weights ({INCEPTION_WEIGHTS_FILE})")
    q.add_argument("--features", help="another local image tower: torchvision:ARCH, timm:NAME, open_clip:MODEL or "
                                      "first_stage (with --feature-weights)")
    q.add_argument("--feature-weights", type=Path, help="the weight file of --features")
    q.add_argument("--fid-count", type=int, help="images per side for FID/KID (default: as many as both have)")
    return q


def feature_extractor(args: argparse.Namespace) -> tuple[object | None, str | None]:
    """(the tower the ``add_tower_args`` options name, its name), or (None, None) without one; a bad weights file
    fails here, before any segmenter trains."""
    from siamese.evaluation.towers import load_feature_extractor

    if args.fid_count is not None and args.fid_count < 2:
        raise ValueError(f"--fid-count must be at least 2, got {args.fid_count}")
    if args.inception:
        return load_feature_extractor("inception", args.inception, device=args.device), "inception"
    if args.features:
        return load_feature_extractor(args.features, args.feature_weights, device=args.device), args.features
    return None, None


def _quality(args: argparse.Namespace, out: Path, split_train: list, split_test: list, extractor) -> dict:
    """FID/KID per synthetic run against the real training images; diversity and memorisation of all runs together
    (memorisation searched over the real training and test images, its thresholds calibrated on them)."""
    from siamese.evaluation import quality
    from siamese.evaluation.features import equal_count, pixel_vectors, read_run_images

    runs = [image for folder in args.synthetic for image in read_run_images(folder)]
    result: dict = {"feature_extractor": None if extractor is None else (args.features or "inception")}
    synth_paths = [r.path for r in runs]
    if extractor is not None:
        # One FID/KID per synthetic folder (pooled folders would mostly measure the first one), each against an equal
        # number of real training images; KID on subsets of half the images, so its ± reflects the sampling.
        result["per_run"] = {}
        for folder in args.synthetic:
            paths = [r.path for r in read_run_images(folder)]
            real_n, synth_n = equal_count(split_train, paths, args.fid_count or min(len(split_train), len(paths)))
            real_f = extractor.features(real_n, progress=not args.no_progress)
            synth_f = extractor.features(synth_n, progress=not args.no_progress)
            subset = min(1000, max(2, len(real_n) // 2))
            kid = quality.kernel_inception_distance(real_f, synth_f, subsets=100, subset_size=subset)
            result["per_run"][str(folder)] = {"fid": quality.frechet_distance(real_f, synth_f), "kid_mean": kid.mean,
                                              "kid_std": kid.std, "kid_subset": subset, "fid_images": len(real_n)}
        if len(args.synthetic) == 1:
            result.update(result["per_run"][str(args.synthetic[0])])
        all_synth_f = extractor.features(synth_paths, progress=not args.no_progress)
        real_f = extractor.features(split_train + split_test, progress=not args.no_progress)
    else:
        result["skipped"] = (f"FID/KID and feature-space diversity/memorisation need --inception PATH (the "
                             f"{INCEPTION_WEIGHTS_FILE} weights) or --features SPEC --feature-weights PATH; "
                             "without them the downscaled pixels stand in as features")
        all_synth_f, real_f = pixel_vectors(synth_paths), pixel_vectors(split_train + split_test)
    diversity = quality.intra_mask_diversity(all_synth_f, [r.source for r in runs],
                                             pixels=pixel_vectors(synth_paths))
    result["diversity"] = {"mean_pixel_rmse": _finite(diversity.mean_pixel_rmse),
                           "mean_feature_cosine": _finite(diversity.mean_feature_cosine) if extractor else None,
                           "masks": len(diversity.per_mask), "skipped_single_sample_masks": diversity.skipped_single}
    # Without an extractor the pixel vectors stand in as features, whose cosine says little (similar-looking tissue
    # is close): the pixel RMSE decides, the cosine flags exact copies only.
    report = quality.memorisation(synth_paths, split_train + split_test, synthetic_features=all_synth_f,
                                  training_features=real_f,
                                  training_splits=["train"] * len(split_train) + ["test"] * len(split_test),
                                  feature_threshold=args.copy_feature_threshold if extractor else 1e-9,
                                  pixel_threshold=args.copy_pixel_threshold)
    report.write_nearest_pairs_png(out / "memorisation.png")
    result["memorisation"] = report.summary()
    return result


def _report(args: argparse.Namespace, result: dict, out: Path, inputs) -> None:
    lines = ["# Evaluation report", "", *leak_lines(inputs),
             f"Real data `{args.real}`; synthetic {', '.join(f'`{s}`' for s in args.synthetic)}. "
             f"{split_line(inputs)} Wall time {result['seconds']:.0f} s.", ""]
    if "benchmark" in result:
        lines += ["## Does the synthetic data help the segmenter? (held-out real test split)", "",
                  *benchmark_table(result["benchmark"]), "", "![benchmark](benchmark.png)", ""]
    lines += ["## Mask fidelity (the real-data segmenter on each generated image vs its conditioning mask)", "",
              "| synthetic run | pairs | Dice mean ± std | median | pairs ≥ 0.7 | Dice vs eroded label |",
              "|---|---|---|---|---|---|"]
    for name, f in result["fidelity"].items():
        label = f"{f['label_dice_mean']:.3f}" if "label_dice_mean" in f else "—"
        lines.append(f"| `{name}` | {f['pairs']} | {f['dice_mean']:.3f} ± {f['dice_std']:.3f} | "
                     f"{f['dice_median']:.3f} | {100 * f['share_ge_0.7']:.0f} % | {label} |")
    q = result["quality"]
    lines += ["", "## Image quality, diversity, memorisation", ""]
    if "per_run" in q:
        lines += [f"FID and KID per synthetic run against the real training images (features: "
                  f"{q['feature_extractor']}; KID ± over 100 subsets):", "",
                  "| synthetic run | images per side | FID | KID ± std (subset size) |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {r['fid_images']} | {r['fid']:.2f} | {r['kid_mean']:.4f} ± {r['kid_std']:.4f} "
                  f"({r['kid_subset']}) |" for name, r in q["per_run"].items()]
        lines.append("")
    else:
        lines.append(f"FID/KID skipped: {q['skipped']}.")
    d = q["diversity"]
    lines.append(f"Diversity among the samples of one mask: pixel RMSE {d['mean_pixel_rmse']} over {d['masks']} "
                 f"masks ({d['skipped_single_sample_masks']} masks with a single sample skipped)"
                 + (f", feature cosine distance {d['mean_feature_cosine']:.4f}" if d["mean_feature_cosine"] else "")
                 + ".")
    m = q["memorisation"]
    lines += [f"Memorisation (nearest real image, training and test split searched): {m['flagged_any']} of "
              f"{m['n_synthetic']} synthetic images flagged as near-copies, {m['flagged_test']} of them of TEST images "
              f"(feature cosine distance < {m['feature_threshold']:.4g}: {m['thresholds_from']['feature']}; pixel "
              f"RMSE < {m['pixel_threshold']:.4g}: {m['thresholds_from']['pixel']}).",
              "", f"Details: {json.dumps({k: v for k, v in m.items() if k != 'closest'})}.", "",
              "![closest synthetic / real pairs](memorisation.png)", ""]
    write_markdown(out / "report.md", lines)


def evaluate(args: argparse.Namespace) -> dict:
    from siamese.evaluation.benchmark import prepare_inputs, run_benchmark, summarise_results

    start = time.perf_counter()
    out: Path = args.out
    cfg = benchmark_config(args)
    extractor, _ = feature_extractor(args)  # a bad weights file fails now, before hours of segmenter training
    inputs = prepare_inputs(args.real, args.synthetic, out, cfg, allow_generator_leak=args.allow_generator_leak)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"real": str(args.real), "synthetic": [str(s) for s in args.synthetic],
                    "split": {"origin": inputs.split.origin, "train": len(inputs.split.train),
                              "test": len(inputs.split.test)},
                    "leak_check": {"warnings": inputs.warnings, "excluded_test_masks": inputs.excluded_test_masks,
                                   "near_duplicates": inputs.near_duplicates}}
    if not args.no_benchmark:
        logger.info("== downstream benchmark")
        rows = run_benchmark(args.real, args.synthetic, out, cfg, device=args.device, progress=not args.no_progress,
                             inputs=inputs)
        result["benchmark"] = summarise_results(rows)
        benchmark_plot(result["benchmark"], out / "benchmark.png")
    logger.info("== mask fidelity")
    result["fidelity"] = _fidelity(args, cfg, out, inputs)
    logger.info("== image quality, diversity, memorisation")
    from siamese.evaluation.features import ImageFile  # real images decoded as the benchmark decodes them

    result["quality"] = _quality(args, out, [ImageFile(p.image, cfg.intensity) for p in inputs.split.train],
                                 [ImageFile(p.image, cfg.intensity) for p in inputs.split.test], extractor)
    result["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(out / "report.json", result, indent=1, default=str)
    _report(args, result, out, inputs)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = make_parser("python -m tools.evaluate", __doc__)
    p.add_argument("--real", type=Path, required=True,
                   help="the real data: a python -m tools.split output (scored on its test/), or a dataset "
                        "(prompt.json layout) split here into OUT/splits.json")
    p.add_argument("--synthetic", type=Path, action="append", required=True,
                   help="a tutorial_inference.py output folder (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder (report.md, report.json, PNGs)")
    p.add_argument("--no-benchmark", action="store_true", help="skip the downstream benchmark")
    q = add_tower_args(p)
    q.add_argument("--copy-feature-threshold", type=float,
                   help="near-copy: feature cosine distance below this (default: calibrated on the real images, half "
                        "the smallest distance between two distinct ones in this tower's features)")
    q.add_argument("--copy-pixel-threshold", type=float,
                   help="near-copy: pixel RMSE at 64² below this (default: calibrated as the feature threshold)")
    add_benchmark_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p


def _body(args: argparse.Namespace) -> int:
    if args.inception and args.features:
        raise ValueError("pass --inception or --features, not both")
    result = evaluate(args)
    logger.info("report: %s (%.0f s)", args.out / "report.md", result["seconds"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
