"""``python -m tools.demo``: the whole Siamese-Diffusion workflow on the embedded default, on CPU, in minutes.

    python -m tools.demo                          # → runs/demo/report.md and runs/demo/grid.png
    python -m tools.demo --out /tmp/demo --pretrain   # also pretrain the tiny base here (about 6 more minutes)

Every step runs through the framework's own command-line tools; the equivalent shell commands are written to
OUT/commands.sh as they run:

1. data: labelled lesion image-mask pairs generated on disk (the few hundred labelled images a user has), split
   first (``python -m tools.split``, 20 % test): every model below trains on OUT/split/train only, and the
   evaluation scores on OUT/split/test, after checking each synthetic folder's provenance;
2. base: the tiny pretrained base model, what SD1.5 is at full scale (data/pretrained/base_tiny.safetensors, made by
   ``python -m tools.pretrain --config configs/base_tiny.yaml`` and checked by sha256; ``--pretrain`` makes it here);
3. ``tool_add_control.py``: the initial ControlNet checkpoint;
4. Siamese-Diffusion training (DeepSpeed ZeRO-2) → ``zero_to_fp32.py`` → ``tool_merge_control.py``;
5. the plain-ControlNet baseline with the same budget (``--no-baseline`` skips it);
6. ``tutorial_inference.py``: pairs from the training side's masks ("real") and augmented ones ("random"), for both
   trained models and the untrained one (the initial checkpoint: its control is zero);
7. ``python -m tools.evaluate`` on the Siamese pairs: a segmenter on the real pairs vs real + synthetic (one seed),
   mask fidelity with a segmenter trained on the real pairs, diversity, memorisation (OUT/eval/);
8. the report: mask fidelity = Dice between a segmentation of each generated image and the mask it was conditioned
   on (a documented colour rule for this generated domain, ``siamese.evaluation.fidelity``, for every model; the
   real-data segmenter's for the Siamese pairs), the downstream table, in OUT/report.md, OUT/report.json and
   OUT/grid.png (mask | generated | overlay, then the baseline and the untrained model).

A stage that finished is skipped on a re-run only when its key matches (OUT/stages.json: the settings that change it
and the keys of the stages it consumes), so a re-run with another --cfg, --seed or --sample-steps recomputes the
sampling and what follows, never relabels old outputs; an interrupted training with the same key resumes from its
newest checkpoint. ``--force`` redoes everything. What it shows and what it cannot: see docs/demo.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ldm.fileio import copy_file_atomic, file_sha256, write_json_atomic

from siamese.config import ConfigError, config_from_metadata
from siamese.data.pairs import read_manifest
from tools import add_control, demo_data, inference, merge_control, pretrain, train, zero_to_fp32
from tools import evaluate as evaluate_tool
from tools import split as split_tool
from tools._cli import make_parser, run
from tools.demo_report import dice_summary, reference_scores, write_grid_figure, write_report

logger = logging.getLogger("siamese.demo")
REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHIPPED_BASE = REPO / "data" / "pretrained" / "base_tiny.safetensors"
SHIPPED_BASE_SHA256 = "53b07add3dc3ab0f6c58dbc9a120a8edac223da14ff2097331effb711fc6be93"
MARKER = ".siamese-demo"
STAGES_FILE = "stages.json"
TEST_FRACTION = 0.2
METHODS = ("siamese", "controlnet")
MODES = ("real", "random")


class DemoError(ValueError):
    """A stage failed; the message names it (one line, exit 1)."""


@dataclass
class Settings:
    out: Path
    train_pairs: int = 200
    steps: int = 800
    lr: float = 1.0e-4
    batch_size: int = 8
    pairs: int = 32
    sample_steps: int = 20
    cfg: float = 3.0
    seed: int = 0
    pretrain: bool = False
    pretrain_steps: int | None = None  # None: configs/base_tiny.yaml's
    baseline: bool = True
    seg_steps: int = 120  # segmenter steps in the evaluation


@dataclass
class Demo:
    settings: Settings
    timings: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)  # this run's stage keys

    @property
    def out(self) -> Path:
        return self.settings.out

    # -- running a tool ---------------------------------------------------------------------------------------------
    def tool(self, stage: str, shown: str, main: Callable[[list[str]], int], argv: list[str]) -> None:
        """Run one CLI in this process, recording the equivalent shell command; a non-zero exit stops the demo."""
        line = f"{shown} {shlex.join(argv)}"
        logger.info("$ %s", line)
        with (self.out / "commands.sh").open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        code = main(argv)
        if code:
            raise DemoError(f"stage {stage}: `{line}` exited with {code} (see the error above)")

    def _recorded(self) -> dict:
        path = self.out / STAGES_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def _record(self, name: str, key: str, done: bool) -> None:
        write_json_atomic(self.out / STAGES_FILE, {**self._recorded(), name: {"key": key, "done": done}}, indent=1)

    def stage(self, name: str, outputs: list[Path], params: dict, upstream: list[str], body: Callable[[], None],
              *, complete: bool = True, resumable: bool = False) -> None:
        """Run ``body`` unless the stage is recorded done with this key (its ``params`` and its ``upstream`` stages'
        keys) and ``complete``. Outputs made under another key are removed first; with the same key an unfinished
        ``resumable`` stage (training) keeps them and continues."""
        key = hashlib.sha256(json.dumps({"params": params, "upstream": [self.keys[u] for u in upstream]},
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.keys[name] = key
        old = self._recorded().get(name, {})
        if old.get("key") == key and old.get("done") and complete:
            logger.info("== %s: already done (--force redoes it)", name)
            self.skipped.append(name)
            return
        if old.get("key") != key or not resumable:
            if old:
                logger.info("== %s: made with other settings or inputs: redone", name)
            for path in outputs:
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        logger.info("== %s", name)
        self._record(name, key, False)
        start = time.perf_counter()
        body()
        self._record(name, key, True)
        self.timings[name] = round(time.perf_counter() - start, 1)

    # -- paths ------------------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def run_dir(self, method: str) -> Path:
        return self.path("runs", method)

    def final_checkpoint(self, method: str) -> Path:
        return self.run_dir(method) / "checkpoints" / f"step={self.settings.steps}.ckpt"

    def model_file(self, model: str) -> Path:
        return self.path("init.safetensors") if model == "untrained" else self.path("models", f"{model}.safetensors")

    def synth_dir(self, model: str, mode: str) -> Path:
        return self.path("synth", model, mode)

    @property
    def models(self) -> tuple[str, ...]:
        return ("siamese", "controlnet", "untrained") if self.settings.baseline else ("siamese", "untrained")

    # -- the stages -------------------------------------------------------------------------------------------------
    def make_data(self) -> None:
        s = self.settings
        self.tool("data", "python -m tools.demo_data", demo_data.main,
                  [str(self.path("data")), "--samples", str(s.train_pairs), "--seed", str(s.seed), "--force"])

    def make_split(self) -> None:
        self.tool("split", "python -m tools.split", split_tool.main,
                  [str(self.path("data")), "--out", str(self.path("split")), "--test-fraction", str(TEST_FRACTION),
                   "--seed", str(self.settings.seed), "--force"])

    def make_base(self) -> None:
        target = self.path("base.safetensors")
        if self.settings.pretrain:
            steps = self.settings.pretrain_steps
            fewer = [f"pretrain.{stage}.total_steps={steps}" for stage in ("autoencoder", "unet")] if steps else []
            self.tool("base", "python -m tools.pretrain", pretrain.main,
                      ["--config", str(CONFIGS / "base_tiny.yaml"), "--out", str(target),
                       f"train.output_dir={self.path('pretrain')}", *fewer])
            return
        if not SHIPPED_BASE.is_file():
            raise DemoError(f"the shipped base {SHIPPED_BASE} is missing (a checkout without data/?): pass --pretrain")
        digest = file_sha256(SHIPPED_BASE)
        if digest != SHIPPED_BASE_SHA256:
            raise DemoError(f"{SHIPPED_BASE} has sha256 {digest}, expected {SHIPPED_BASE_SHA256}: the file is "
                            "damaged or replaced (restore it from git, or pass --pretrain)")
        copy_file_atomic(SHIPPED_BASE, target)
        with (self.out / "commands.sh").open("a", encoding="utf-8") as handle:
            handle.write(f"cp {shlex.quote(str(SHIPPED_BASE))} {shlex.quote(str(target))}   # sha256 checked\n")
        logger.info("base: the shipped tiny base %s (sha256 ok)", SHIPPED_BASE)

    def scale_override(self) -> str:
        from ldm.checkpoint import read_metadata  # torch-backed modules: imported when used (fast --help)

        base = self.path("base.safetensors")
        cfg = config_from_metadata(read_metadata(base), str(base))
        if cfg is None:
            raise DemoError(f"{base} carries no config in its metadata (not made by tools.pretrain?)")
        return f"model.first_stage.scale_factor={cfg.model.first_stage.scale_factor}"

    def make_init(self) -> None:
        self.tool("init", "python tool_add_control.py", add_control.main,
                  [str(self.path("base.safetensors")), str(self.path("init.safetensors")), "--config",
                   str(CONFIGS / "siamese_tiny.yaml"), self.scale_override(), "--force"])

    def train_method(self, method: str) -> None:
        s, run_dir = self.settings, self.run_dir(method)
        argv = ["--config", str(CONFIGS / f"{method}_tiny.yaml"), f"train.init_ckpt={self.path('init.safetensors')}",
                f"data.root={self.path('split', 'train')}", f"train.output_dir={run_dir}",
                f"train.total_steps={s.steps}",
                f"train.lr={s.lr}", f"train.batch_size={s.batch_size}", f"train.seed={s.seed + 42}",
                f"train.checkpoint_every={max(1, s.steps // 3)}", "train.keep_checkpoints=1",
                f"train.image_log_every={s.steps}", "train.log_every=10", f"sample.steps={s.sample_steps}",
                f"sample.cfg_scale={s.cfg}", self.scale_override()]
        if train.find_latest_checkpoint(run_dir / "checkpoints"):
            argv += ["--resume", "latest"]  # an interrupted training continues where it stopped
        else:
            argv += ["--force"]  # the demo's own run directory: a start that left no checkpoint starts over
        self.tool(f"train {method}", "python tutorial_train.py", train.main, argv)

    def export_method(self, method: str) -> None:
        trained = self.run_dir(method) / "trained.safetensors"
        self.tool(f"export {method}", "python zero_to_fp32.py", zero_to_fp32.main,
                  [str(self.final_checkpoint(method)), str(trained), "--force"])
        self.tool(f"export {method}", "python tool_merge_control.py", merge_control.main,
                  ["--base", str(self.path("init.safetensors")), "--trained", str(trained), "--out",
                   str(self.model_file(method)), "--force"])

    def sample(self, model: str, mode: str) -> None:
        s = self.settings
        self.tool(f"sample {model}", "python tutorial_inference.py", inference.main,
                  ["--ckpt", str(self.model_file(model)), "--masks", str(self.path("split", "train", "prompt.json")),
                   "--out",
                   str(self.synth_dir(model, mode)), "--limit", str(s.pairs), "--mask-mode", mode, "--steps",
                   str(s.sample_steps), "--cfg", str(s.cfg), "--seed", str(s.seed), "--batch-size", "8"])

    def evaluate(self) -> None:
        """The evaluation tools on the demo's data: the downstream benchmark (one seed: real vs real + Siamese
        pairs), mask fidelity with a segmenter trained on the real pairs, diversity and memorisation."""
        argv = ["--real", str(self.path("split")), "--out", str(self.path("eval")), "--seeds", "1",
                "--arms", "real,real+synthetic", "--seg-steps", str(self.settings.seg_steps), "--resolution", "64",
                "--no-progress"]
        for mode in MODES:
            argv += ["--synthetic", str(self.synth_dir("siamese", mode))]
        self.tool("evaluate", "python -m tools.evaluate", evaluate_tool.main, argv)

    def references(self) -> dict[str, dict[str, float]]:
        return reference_scores(self.path("split", "train", "prompt.json"), self.path("base.safetensors"),
                                self.settings.pairs)

    def report(self, total_seconds: float) -> dict:
        from siamese.evaluation.fidelity import score_pairs

        scores = {model: {mode: score_pairs(self.synth_dir(model, mode)) for mode in MODES} for model in self.models}
        summary = {model: {mode: dice_summary([p.dice for p in pairs]) for mode, pairs in by_mode.items()}
                   for model, by_mode in scores.items()}
        result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.settings).items()},
                  "fidelity": summary, "references": self.references(),
                  "per_pair": {m: {mode: [asdict(p) for p in pairs] for mode, pairs in d.items()}
                               for m, d in scores.items()},
                  "evaluation": json.loads(self.path("eval", "report.json").read_text(encoding="utf-8")),
                  "stage_seconds": self.timings, "skipped_stages": self.skipped,
                  "wall_seconds": round(total_seconds, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        write_json_atomic(self.path("report.json"), result)
        write_grid_figure(self.path("grid.png"), self.synth_dir("siamese", "real"),
                          [(m, self.synth_dir(m, "real")) for m in self.models if m != "siamese"], rows=8)
        write_report(self.path("report.md"), result)
        return result

    def run(self) -> dict:
        start = time.perf_counter()
        s = self.settings
        self.stage("data", [self.path("data")], {"pairs": s.train_pairs, "seed": s.seed}, [], self.make_data,
                   complete=self.path("data", "prompt.json").is_file())
        self.stage("split", [self.path("split")], {"fraction": TEST_FRACTION, "seed": s.seed}, ["data"],
                   self.make_split, complete=self.path("split", "splits.json").is_file())
        self.stage("base", [self.path("base.safetensors"), self.path("pretrain")],
                   {"pretrain": s.pretrain, "steps": s.pretrain_steps}, [], self.make_base,
                   complete=self.path("base.safetensors").is_file())
        self.stage("init", [self.path("init.safetensors")], {}, ["base"], self.make_init,
                   complete=self.path("init.safetensors").is_file())
        # --sample-steps and --cfg reach training only through its image log: not part of its key.
        training = {k: getattr(s, k) for k in ("steps", "lr", "batch_size", "seed")}
        for method in METHODS if s.baseline else ("siamese",):
            self.stage(f"train {method}", [self.run_dir(method)], training, ["split", "init"],
                       lambda m=method: self.train_method(m), complete=self.final_checkpoint(method).is_dir(),
                       resumable=True)
            self.stage(f"export {method}", [self.model_file(method)], {}, [f"train {method}"],
                       lambda m=method: self.export_method(m), complete=self.model_file(method).is_file())
        sampling = {k: getattr(s, k) for k in ("pairs", "sample_steps", "cfg", "seed")}
        for model in self.models:
            for mode in MODES:
                made = len(read_manifest(self.synth_dir(model, mode) / "manifest.jsonl")) >= s.pairs
                self.stage(f"sample {model} {mode}", [self.synth_dir(model, mode)], sampling,
                           ["split", "init" if model == "untrained" else f"export {model}"],
                           lambda m=model, md=mode: self.sample(m, md), complete=made)
        self.stage("evaluate", [self.path("eval")], {"seg_steps": s.seg_steps}, ["split"] +
                   [f"sample siamese {mode}" for mode in MODES], self.evaluate,
                   complete=self.path("eval", "report.json").is_file())
        logger.info("== report")
        return self.report(time.perf_counter() - start)


def prepare_out(out: Path, force: bool) -> None:
    """OUT is the demo's own folder: refused when it holds other things, cleaned of the demo's outputs on --force."""
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConfigError(f"--out {out} is not empty and was not made by the demo: choose another folder")
    if force and out.exists():
        logger.warning("--force: removing the demo's earlier outputs in %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m tools.demo\n", encoding="utf-8")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = make_parser("python -m tools.demo", __doc__)
    d = Settings(out=Path("runs/demo"))
    p.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--pretrain", action="store_true", help="pretrain the tiny base here instead of using the "
                                                           "shipped one (configs/base_tiny.yaml; about 6 more minutes)")
    p.add_argument("--pretrain-steps", type=int, metavar="N",
                   help="with --pretrain: N steps per stage instead of the preset's (quicker, a weaker base)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-ControlNet comparison")
    p.add_argument("--train-pairs", type=int, default=d.train_pairs, help=f"labelled pairs (default {d.train_pairs})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps per method (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"training batch (default {d.batch_size})")
    p.add_argument("--pairs", type=int, default=d.pairs, help=f"pairs sampled per model and mask mode "
                                                             f"(default {d.pairs})")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help=f"DDIM steps (default {d.sample_steps})")
    p.add_argument("--cfg", type=float, default=d.cfg, help=f"guidance scale (default {d.cfg})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"data and sampling seed (default {d.seed})")
    p.add_argument("--seg-steps", type=int, default=d.seg_steps,
                   help=f"training steps of the evaluation's segmenters (default {d.seg_steps})")
    p.add_argument("--force", action="store_true", help="redo every stage (removes the demo's earlier outputs)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, tracebacks")
    return p.parse_args(argv)


def _body(args: argparse.Namespace) -> int:
    for key in ("train_pairs", "steps", "batch_size", "pairs", "sample_steps", "pretrain_steps", "seg_steps"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    train_side = args.train_pairs - max(1, round(TEST_FRACTION * args.train_pairs))
    if args.pairs > train_side:
        raise ConfigError(f"--pairs {args.pairs} exceeds the {train_side} pairs of the training side of "
                          f"--train-pairs {args.train_pairs} (one pair per training mask)")
    settings = Settings(out=args.out, train_pairs=args.train_pairs, steps=args.steps, lr=args.lr,
                        batch_size=args.batch_size, pairs=args.pairs, sample_steps=args.sample_steps, cfg=args.cfg,
                        seed=args.seed, pretrain=args.pretrain, pretrain_steps=args.pretrain_steps,
                        baseline=not args.no_baseline, seg_steps=args.seg_steps)
    prepare_out(args.out, args.force)
    result = Demo(settings).run()
    siamese = result["fidelity"]["siamese"]["real"]
    logger.info("mask fidelity (Dice, real masks, %d pairs): Siamese %.3f%s, untrained %.3f", siamese["n"],
                siamese["mean"], f", ControlNet {result['fidelity']['controlnet']['real']['mean']:.3f}"
                if "controlnet" in result["fidelity"] else "", result["fidelity"]["untrained"]["real"]["mean"])
    logger.info("report: %s\ngrid:   %s\n(%.0f s, peak memory %.0f MiB)", args.out / "report.md", args.out / "grid.png",
                result["wall_seconds"], result["peak_rss_mib"])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(_body, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
