"""Is Siamese-Diffusion worth its cost on the demo's data? Both generators, two training seeds each, compared.

    nice -n 10 python bench/compare_demo.py --out runs/compare_demo      # tens of minutes on 2 CPU cores
    python bench/compare_demo.py --out runs/compare_demo --generators-only   # stop after sampling (re-run goes on)

The demo's own stages first (``tools.demo``: the generated data, split first with ``tools.split``, the shipped tiny
base, ``tool_add_control.py``), then for each method (Siamese-Diffusion, plain ControlNet) and training seed k:
``tutorial_train.py`` with the demo's settings (``--steps`` steps, lr, batch; ``train.seed`` = 42 + k, so k = 0 is
the demo's own training), ``zero_to_fp32.py``, ``tool_merge_control.py``, ``tutorial_inference.py`` on the first
``--pairs`` masks of the training side (sampling seed k), ``python -m tools.filter_pairs`` (the base's VAE encoder
as the feature tower, the domain's own features) and finally ``python -m tools.compare_generators`` with every
schedule (real only, real + synthetic at each ratio, synthetic only, pretrain-finetune, filtered vs all), FID/KID
in the same VAE features, ``--seg-seeds`` segmenter seeds and the colour rule of the generated domain beside the
real-data segmenter for mask fidelity. Every stage is keyed as the demo's are (OUT/stages.json): a re-run skips
what is done with the same settings and resumes an interrupted training. The demo itself is not changed.
OUT/compare/comparison.md is the answer; OUT/compare_demo.json the stage timings and the wall time of this run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm.fileio import write_json_atomic  # noqa: E402

from tools import filter_pairs, inference, train  # noqa: E402
from tools.demo import CONFIGS, METHODS, TEST_FRACTION, Demo, DemoError, Settings, prepare_out  # noqa: E402

logger = logging.getLogger("siamese.compare_demo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/compare_demo.py", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/compare_demo"), help="output folder (runs/compare_demo)")
    p.add_argument("--seeds", type=int, default=2, help="training seeds per method (default 2)")
    p.add_argument("--seg-seeds", type=int, default=2, help="segmenter seeds per schedule (default 2)")
    p.add_argument("--steps", type=int, default=800, help="training steps per method and seed (the demo's 800)")
    p.add_argument("--pairs", type=int, default=160, help="pairs sampled per model (default 160: every training mask)")
    p.add_argument("--ratios", default="0.25,0.5,1", help="synthetic:real ratios of the sweep (0.25,0.5,1)")
    p.add_argument("--seg-steps", type=int, default=120, help="segmenter steps (the demo's evaluation: 120)")
    p.add_argument("--no-filter", action="store_true", help="no filtered-vs-all schedule")
    p.add_argument("--generators-only", action="store_true", help="stop after training and sampling")
    p.add_argument("--force", action="store_true", help="redo every stage")
    return p.parse_args(argv)


class CompareDemo(Demo):
    """The demo's stages and tools, with seeded copies of the two trainings."""

    def train_seeded(self, method: str, label: str, k: int) -> None:
        s, run_dir = self.settings, self.run_dir(label)
        argv = ["--config", str(CONFIGS / f"{method}_tiny.yaml"), f"train.init_ckpt={self.path('init.safetensors')}",
                f"data.root={self.path('split', 'train')}", f"train.output_dir={run_dir}",
                f"train.total_steps={s.steps}", f"train.lr={s.lr}", f"train.batch_size={s.batch_size}",
                f"train.seed={s.seed + 42 + k}", f"train.checkpoint_every={max(1, s.steps // 3)}",
                "train.keep_checkpoints=1", f"train.image_log_every={s.steps}", "train.log_every=10",
                f"sample.steps={s.sample_steps}", f"sample.cfg_scale={s.cfg}", self.scale_override()]
        argv += ["--resume", "latest"] if train.find_latest_checkpoint(run_dir / "checkpoints") else ["--force"]
        self.tool(f"train {label}", "python tutorial_train.py", train.main, argv)

    def sample_seeded(self, label: str, k: int) -> None:
        s = self.settings
        self.tool(f"sample {label}", "python tutorial_inference.py", inference.main,
                  ["--ckpt", str(self.model_file(label)), "--masks", str(self.path("split", "train", "masks")),
                   "--out", str(self.synth_dir(label, "real")), "--limit", str(s.pairs), "--mask-mode", "real",
                   "--steps", str(s.sample_steps), "--cfg", str(s.cfg), "--seed", str(k), "--batch-size", "8"])

    def filter_seeded(self, label: str) -> None:
        self.tool(f"filter {label}", "python -m tools.filter_pairs", filter_pairs.main,
                  [str(self.synth_dir(label, "real")), "--real", str(self.path("split", "train")), "--out",
                   str(self.synth_dir(label, "filtered")), "--features", "first_stage", "--weights",
                   str(self.path("base.safetensors")), "--force", "--no-progress"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("DeepSpeed", "deepspeed", "pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    out = args.out.resolve()
    train_side = 200 - max(1, round(TEST_FRACTION * 200))
    if not 1 <= args.pairs <= train_side or args.seeds < 2 or args.seg_seeds < 2:
        print(f"need 1 <= --pairs <= {train_side}, --seeds >= 2 and --seg-seeds >= 2", file=sys.stderr)
        return 2
    prepare_out(out, args.force)
    demo = CompareDemo(Settings(out=out, steps=args.steps, pairs=args.pairs, seg_steps=args.seg_steps))
    s = demo.settings
    try:
        demo.stage("data", [demo.path("data")], {"pairs": s.train_pairs, "seed": s.seed}, [], demo.make_data,
                   complete=demo.path("data", "prompt.json").is_file())
        demo.stage("split", [demo.path("split")], {"fraction": TEST_FRACTION, "seed": s.seed}, ["data"],
                   demo.make_split, complete=demo.path("split", "splits.json").is_file())
        demo.stage("base", [demo.path("base.safetensors")], {"pretrain": False, "steps": None}, [], demo.make_base,
                   complete=demo.path("base.safetensors").is_file())
        demo.stage("init", [demo.path("init.safetensors")], {}, ["base"], demo.make_init,
                   complete=demo.path("init.safetensors").is_file())
        training = {k: getattr(s, k) for k in ("steps", "lr", "batch_size", "seed")}
        labels: dict[str, list[str]] = {method: [] for method in METHODS}
        filtered_ok = not args.no_filter
        for method in METHODS:
            for k in range(args.seeds):
                label = f"{method}_s{k}"
                labels[method].append(label)
                demo.stage(f"train {label}", [demo.run_dir(label)], {**training, "train_seed": s.seed + 42 + k},
                           ["split", "init"], lambda m=method, lb=label, kk=k: demo.train_seeded(m, lb, kk),
                           complete=demo.final_checkpoint(label).is_dir(), resumable=True)
                demo.stage(f"export {label}", [demo.model_file(label)], {}, [f"train {label}"],
                           lambda lb=label: demo.export_method(lb), complete=demo.model_file(label).is_file())
                made = demo.synth_dir(label, "real") / "manifest.jsonl"
                done = made.is_file() and len(made.read_text(encoding="utf-8").splitlines()) >= s.pairs
                demo.stage(f"sample {label}", [demo.synth_dir(label, "real")],
                           {"pairs": s.pairs, "sample_steps": s.sample_steps, "cfg": s.cfg, "sample_seed": k},
                           ["split", f"export {label}"], lambda lb=label, kk=k: demo.sample_seeded(lb, kk),
                           complete=done)
                if filtered_ok:
                    try:
                        demo.stage(f"filter {label}", [demo.synth_dir(label, "filtered")], {},
                                   [f"sample {label}", "base"], lambda lb=label: demo.filter_seeded(lb),
                                   complete=(demo.synth_dir(label, "filtered") / "filter_report.json").is_file())
                    except DemoError as exc:
                        logger.warning("filtered vs all skipped: %s", exc)
                        filtered_ok = False
        if args.generators_only:
            logger.info("generators trained and sampled (%.0f s); re-run without --generators-only to compare",
                        time.perf_counter() - start)
            return 0
        cmp_argv = ["--real", str(demo.path("split")), "--out", str(demo.path("compare")), "--seeds",
                    str(args.seg_seeds), "--synthetic-ratio", args.ratios, "--seg-steps", str(args.seg_steps),
                    "--resolution", "64", "--features", "first_stage", "--feature-weights",
                    str(demo.path("base.safetensors")), "--colour-rule", "--no-progress"]
        for method in METHODS:
            folders = [str(demo.synth_dir(lb, "real")) for lb in labels[method]]
            cmp_argv += ["--generator", f"{method}=" + ",".join(folders)]
            if filtered_ok:
                cmp_argv += ["--filtered", f"{method}=" + ",".join(str(demo.synth_dir(lb, "filtered"))
                                                                   for lb in labels[method])]
        upstream = [f"{'filter' if filtered_ok else 'sample'} {lb}" for m in METHODS for lb in labels[m]]
        from tools import compare_generators

        demo.stage("compare", [demo.path("compare")], {"argv": cmp_argv}, ["split", *upstream],
                   lambda: demo.tool("compare", "python -m tools.compare_generators", compare_generators.main,
                                     cmp_argv),
                   complete=(demo.path("compare", "comparison.json")).is_file())
    except DemoError as exc:
        logger.error("%s", exc)
        return 1
    wall = time.perf_counter() - start
    record = {"argv": sys.argv[1:] if argv is None else argv, "wall_seconds": round(wall, 1),
              "stage_seconds": demo.timings, "skipped_stages": demo.skipped, "seeds": args.seeds,
              "seg_seeds": args.seg_seeds, "split": str(demo.path("split", "splits.json"))}
    write_json_atomic(out / "compare_demo.json", record, indent=1)
    logger.info("comparison: %s (wall %.0f s this run)", demo.path("compare", "comparison.md"), wall)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
