"""Does the synthetic data help my segmenter? The downstream benchmark of the paper's tables.

For each arm and seed a segmenter (``siamese.evaluation.segmenter``) is trained and scored on the held-out real test
split (a ``tools.split`` output, or ``splits.json`` made once and reused): **real** (the real training split),
**real+synthetic** at each ratio (``ratio × n_real`` synthetic pairs added, taken in a fixed seeded order) and
**synthetic** only (as many synthetic pairs as the largest ratio uses). Before anything is trained the synthetic
folders pass the provenance leak check (``siamese.evaluation.leaks``: a generator that saw a test image is refused,
pairs generated from a test mask are excluded and counted), and every training set is checked against the test
split (``splits.check_no_leak``). Results go to ``results.csv`` one row per (arm, ratio, seed), written as each run
finishes, each with the key of its inputs (the digests of the pairs it trained and was scored on, the settings): a
re-run reuses a row only when its key matches, so changed data or settings recompute and never relabel old rows.
The metrics are mDice and mIoU over the test images
(``metrics.mask_scores`` at threshold 0.5), reported as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from ldm.fileio import atomic_path, write_json_atomic

import numpy as np

from siamese.data.images import read_image_rgb
from siamese.data.masks import read_mask
from siamese.data.provenance import digest_file
from siamese.data.split import Pair
from siamese.evaluation.leaks import NEAR_DUPLICATE_CORRELATION, LeakReport, check_synthetic, near_duplicates
from siamese.evaluation.metrics import dice, iou
from siamese.evaluation.segmenter import SegmenterConfig, predict, save_segmenter, train_segmenter
from siamese.evaluation.splits import RealSplit, check_no_leak, real_split

logger = logging.getLogger(__name__)

RESULTS = "results.csv"
COLUMNS = ("arm", "ratio", "seed", "n_real", "n_synthetic", "mdice", "miou", "seconds", "inputs")


@dataclass(frozen=True)
class BenchmarkConfig:
    seeds: int = 3
    ratios: tuple[float, ...] = (1.0,)
    arms: tuple[str, ...] = ("real", "real+synthetic", "synthetic")
    test_fraction: float = 0.2
    split_seed: int = 0
    group_regex: str | None = None
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)

    def __post_init__(self) -> None:
        unknown = set(self.arms) - {"real", "real+synthetic", "synthetic"}
        if unknown:
            raise ValueError(f"unknown arm(s) {sorted(unknown)}; expected real, real+synthetic, synthetic")
        if self.seeds < 1 or not self.ratios or min(self.ratios) <= 0:
            raise ValueError("need --seeds >= 1 and positive --synthetic-ratio values")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class Inputs:
    """Everything a benchmark consumes, checked: the real split, the synthetic pairs that may join training (leak
    checked, in the fixed seeded order), what was dropped or accepted, and the digests that key every result."""

    split: RealSplit
    synthetic: list[Pair]
    excluded_test_masks: int = 0
    warnings: list[str] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)

    @cached_property
    def train_digests(self) -> list[list[str]]:
        return _digests(self.split.train)

    @cached_property
    def test_digests(self) -> list[list[str]]:
        return _digests(self.split.test)

    @cached_property
    def synthetic_digests(self) -> list[list[str]]:
        return _digests(self.synthetic)


def _digests(pairs: Sequence[Pair]) -> list[list[str]]:
    return [[digest_file(p.image), digest_file(p.mask)] for p in pairs]


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def segmenter_key(train: Sequence[Sequence[str]], cfg: SegmenterConfig, seed: int) -> str:
    """The key of a segmenter's inputs: its training pairs (digests, in order), its settings, its seed."""
    return _key({"train": list(map(list, train)), "segmenter": asdict(cfg), "seed": seed})


def row_key(arm: str, ratio: float, seed: int, count: int, inputs: Inputs, cfg: SegmenterConfig) -> str:
    """The key of one result row: the segmenter's inputs (real training pairs for the arms that use them, the first
    ``count`` synthetic pairs) and the test pairs it is scored on. A row whose key differs is recomputed."""
    train = (inputs.train_digests if arm != "synthetic" else []) + inputs.synthetic_digests[:count]
    return _key({"arm": arm, "ratio": float(ratio), "segmenter": segmenter_key(train, cfg, seed),
                 "test": inputs.test_digests})


def prepare_inputs(real_root: str | Path, synthetic: Sequence[str | Path], out: str | Path, cfg: BenchmarkConfig, *,
                   allow_generator_leak: bool = False) -> Inputs:
    """The real split (``real_root``: a dataset, split here into ``out/splits.json``, or a ``tools.split`` output)
    and the synthetic pairs, every check done before anything is written: real test pairs in the training side,
    synthetic pairs whose models saw a test image (``siamese.evaluation.leaks``), pairs without a resolvable source."""
    split = real_split(real_root, out, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       group_regex=cfg.group_regex)
    check_no_leak(split.train, split.test)
    report = check_synthetic(synthetic, split.test, allow_leak=allow_generator_leak) if synthetic else LeakReport([])
    needs_synth = any(arm != "real" for arm in cfg.arms)
    if needs_synth and not report.pairs:
        raise ValueError("the synthetic arms need --synthetic sampling folders with pairs from training masks")
    order = np.random.default_rng(cfg.split_seed).permutation(len(report.pairs)) if report.pairs else []
    inputs = Inputs(split, [report.pairs[i] for i in order], report.excluded_test_masks, list(report.warnings))
    inputs.near_duplicates = near_duplicates(split.train, split.test)
    for train_name, test_name, corr in inputs.near_duplicates[:5]:
        inputs.warnings.append(f"near-duplicate: training image {train_name} and test image {test_name} correlate "
                               f"{corr:.3f} (≥ {NEAR_DUPLICATE_CORRELATION}: likely the same picture)")
    if len(inputs.near_duplicates) > 5:
        inputs.warnings.append(f"… {len(inputs.near_duplicates) - 5} more near-duplicate train/test pairs")
    split.save()
    return inputs


def load_pairs(pairs: Sequence[Pair]) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_image_rgb(p.image), read_mask(p.mask)) for p in pairs]


def score(model, pairs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: SegmenterConfig, device: str = "cpu"
          ) -> dict[str, float]:
    """mDice / mIoU of a segmenter on (image, mask) pairs (threshold ``cfg.threshold``)."""
    probs = predict(model, [image for image, _ in pairs], cfg, device=device)
    predicted = [(p > cfg.threshold, mask) for p, (_, mask) in zip(probs, pairs)]
    return {"mdice": float(np.mean([dice(p, m) for p, m in predicted])),
            "miou": float(np.mean([iou(p, m) for p, m in predicted]))}


def _read_results(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _write_results(path: Path, rows: Sequence[dict]) -> None:
    """Rewrite results.csv (temporary file, rename): a crash never leaves half a row."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: row.get(k, "") for k in COLUMNS} for row in rows])


def _append_result(path: Path, row: dict) -> None:
    _write_results(path, _read_results(path) + [row])


def run_benchmark(real_root: str | Path, synthetic: Sequence[str | Path], out: str | Path, cfg: BenchmarkConfig, *,
                  device: str = "cpu", progress: bool = True, inputs: Inputs | None = None,
                  allow_generator_leak: bool = False) -> list[dict[str, str]]:
    """Train and score every (arm, ratio, seed) whose row in ``out/results.csv`` is missing or was made from other
    inputs (its ``inputs`` key differs: other data, other settings); returns the rows of this plan."""
    import time

    out = Path(out)
    if inputs is None:
        inputs = prepare_inputs(real_root, synthetic, out, cfg, allow_generator_leak=allow_generator_leak)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "benchmark.json", {"config": asdict(cfg), "real": str(real_root),
                                               "synthetic": [str(s) for s in synthetic], "split": inputs.split.origin},
                      indent=1)
    train_real, test, synth = inputs.split.train, inputs.split.test, inputs.synthetic
    plan = []
    for arm in cfg.arms:
        for ratio in (cfg.ratios if arm == "real+synthetic" else ((max(cfg.ratios),) if arm == "synthetic" else (0,))):
            wanted = round(ratio * len(train_real)) if arm != "real" else 0
            count = min(len(synth), wanted)
            if count < wanted:
                logger.warning("%s ×%g: only %d synthetic pairs for the %d asked", arm, ratio, count, wanted)
            for seed in range(cfg.seeds):
                plan.append((arm, float(ratio), seed, count, row_key(arm, ratio, seed, count, inputs, cfg.segmenter)))
    results_path = out / RESULTS
    old = _read_results(results_path)
    keys = {p[4] for p in plan}
    kept = [r for r in old if r.get("inputs") in keys]
    if len(kept) < len(old):
        logger.info("%d rows of %s were made from other inputs or settings: dropped, not reused", len(old) - len(kept),
                    results_path)
        _write_results(results_path, kept)
    done = {r["inputs"] for r in kept}
    todo = [p for p in plan if p[4] not in done]
    logger.info("%d real train / %d test pairs, %d synthetic pairs; %d runs (%d done): %s", len(train_real), len(test),
                len(synth), len(plan), len(plan) - len(todo), ", ".join(f"{a} ×{r:g} s{s}" for a, r, s, _, _ in todo))
    test_data = load_pairs(test) if todo else []
    real_data = load_pairs(train_real) if todo else []
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for arm, ratio, seed, count, key in todo:
        chosen = synth[:count]
        train_pairs = (train_real if arm != "synthetic" else []) + chosen
        check_no_leak(train_pairs, test)
        for i in range(count):
            if i not in cache:
                cache[i] = load_pairs([synth[i]])[0]
        data = (real_data if arm != "synthetic" else []) + [cache[i] for i in range(count)]
        start = time.perf_counter()
        model = train_segmenter(data, cfg.segmenter, seed=seed, device=device, progress=progress,
                                desc=f"{arm} ×{ratio:g} seed {seed}")
        if arm == "real" and seed == 0:
            save_segmenter(model, cfg.segmenter, out / "segmenter_real_seed0.safetensors",
                           trained_on=segmenter_key(inputs.train_digests, cfg.segmenter, 0))
        metrics = score(model, test_data, cfg.segmenter, device)
        row = {"arm": arm, "ratio": ratio, "seed": seed, "n_real": len(train_real) if arm != "synthetic" else 0,
               "n_synthetic": count, "mdice": round(metrics["mdice"], 5), "miou": round(metrics["miou"], 5),
               "seconds": round(time.perf_counter() - start, 1), "inputs": key}
        _append_result(results_path, row)
        logger.info("%s ×%g seed %d: mDice %.4f, mIoU %.4f", arm, ratio, seed, metrics["mdice"], metrics["miou"])
    rows = {r["inputs"]: r for r in _read_results(results_path)}
    return [rows[p[4]] for p in plan if p[4] in rows]


def summarise_results(rows: Sequence[dict[str, str]]) -> list[dict]:
    """Mean ± std over seeds per (arm, ratio), in the order the arms first appear."""
    groups: dict[tuple[str, float], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], float(row["ratio"])), []).append(row)
    table = []
    for (arm, ratio), items in groups.items():
        dice = np.array([float(r["mdice"]) for r in items])
        iou = np.array([float(r["miou"]) for r in items])
        table.append({"arm": arm, "ratio": ratio, "seeds": len(items), "n_real": int(items[0]["n_real"]),
                      "n_synthetic": int(items[0]["n_synthetic"]), "mdice_mean": float(dice.mean()),
                      "mdice_std": float(dice.std()), "miou_mean": float(iou.mean()), "miou_std": float(iou.std()),
                      "mdice_per_seed": dice.tolist()})
    return table
