"""Does the synthetic data help my segmenter? The downstream benchmark of the paper's tables.

For each arm and seed a segmenter (``siamese.evaluation.segmenter``) is trained and scored on the held-out real test
split (``splits.json``, made once, reused): **real** (the real training split), **real+synthetic** at each ratio
(``ratio × n_real`` synthetic pairs added, taken in a fixed seeded order) and **synthetic** only (as many synthetic
pairs as the largest ratio uses). Synthetic pairs generated from a test mask are excluded (and counted), and every
training set is checked against the test split before training (``splits.check_no_leak``). Results go to
``results.csv`` one row per (arm, ratio, seed), written as each run finishes: a re-run skips finished rows (resume)
and refuses an output folder made with other settings. The metrics are mDice and mIoU over the test images
(``metrics.mask_scores`` at threshold 0.5), reported as mean ± std over seeds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ldm.fileio import atomic_path

import numpy as np

from siamese.data.images import read_image_rgb
from siamese.data.masks import read_mask
from siamese.data.pairs import read_manifest
from siamese.evaluation.metrics import dice, iou
from siamese.evaluation.segmenter import SegmenterConfig, predict, save_segmenter, train_segmenter
from siamese.evaluation.splits import Pair, check_no_leak, load_or_make_split, real_pairs

logger = logging.getLogger(__name__)

RESULTS = "results.csv"
COLUMNS = ("arm", "ratio", "seed", "n_real", "n_synthetic", "mdice", "miou", "seconds")


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

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def synthetic_pairs(folders: Sequence[str | Path]) -> list[Pair]:
    """The pairs of one or more sampling runs (``manifest.jsonl``), in manifest order."""
    pairs = []
    for folder in folders:
        folder = Path(folder)
        records = read_manifest(folder / "manifest.jsonl")
        if not records:
            raise FileNotFoundError(f"{folder}: no manifest.jsonl with sampled pairs (a tutorial_inference.py --out?)")
        for record in records.values():
            source = Path(record["source"]) if record.get("source") else None
            pairs.append(Pair(f"{folder.name}/{record['name']}", folder / record["image"], folder / record["mask"],
                              source))
    return pairs


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


def _append_result(path: Path, row: dict) -> None:
    """Rewrite results.csv with the new row (temporary file, rename): a crash never leaves half a row."""
    rows = _read_results(path) + [{k: row[k] for k in COLUMNS}]
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def run_benchmark(real_root: str | Path, synthetic: Sequence[str | Path], out: str | Path, cfg: BenchmarkConfig, *,
                  device: str = "cpu", progress: bool = True) -> list[dict[str, str]]:
    """Train and score every (arm, ratio, seed) not yet in ``out/results.csv``; returns all rows."""
    import time

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = out / "benchmark.json"
    if settings.is_file() and json.loads(settings.read_text())["digest"] != cfg.digest():
        raise ValueError(f"{out} holds a benchmark made with other settings ({settings}); use another --out")
    settings.write_text(json.dumps({"digest": cfg.digest(), "config": asdict(cfg), "real": str(real_root),
                                    "synthetic": [str(s) for s in synthetic]}, indent=1), encoding="utf-8")
    real = real_pairs(real_root)
    split = load_or_make_split(out, real, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                               group_regex=cfg.group_regex)
    by_name = {p.name: p for p in real}
    train_real = [by_name[n] for n in split["train"]]
    test = [by_name[n] for n in split["test"]]
    test_masks = {p.mask.resolve() for p in test}
    synth_all = synthetic_pairs(synthetic) if synthetic else []
    synth = [p for p in synth_all if p.source is None or p.source.resolve() not in test_masks]
    if len(synth) < len(synth_all):
        logger.info("excluded %d synthetic pairs generated from test masks (%d remain)", len(synth_all) - len(synth),
                    len(synth))
    needs_synth = any(arm != "real" for arm in cfg.arms)
    if needs_synth and not synth:
        raise ValueError("the synthetic arms need --synthetic sampling folders with pairs from training masks")
    order = np.random.default_rng(cfg.split_seed).permutation(len(synth)) if synth else []
    synth = [synth[i] for i in order]
    test_data = load_pairs(test)
    real_data = load_pairs(train_real)
    results_path = out / RESULTS
    done = {(r["arm"], float(r["ratio"]), int(r["seed"])) for r in _read_results(results_path)}
    plan = []
    for arm in cfg.arms:
        for ratio in (cfg.ratios if arm == "real+synthetic" else ((max(cfg.ratios),) if arm == "synthetic" else (0,))):
            for seed in range(cfg.seeds):
                plan.append((arm, float(ratio), seed))
    todo = [p for p in plan if p not in done]
    logger.info("%d real train / %d test pairs, %d synthetic pairs; %d runs (%d done): %s", len(train_real), len(test),
                len(synth), len(plan), len(plan) - len(todo), ", ".join(f"{a} ×{r:g} s{s}" for a, r, s in todo))
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for arm, ratio, seed in todo:
        count = min(len(synth), round(ratio * len(train_real))) if arm != "real" else 0
        if count < round(ratio * len(train_real)) and arm != "real":
            logger.warning("%s ×%g: only %d synthetic pairs for the %d asked", arm, ratio, count,
                           round(ratio * len(train_real)))
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
            save_segmenter(model, cfg.segmenter, out / "segmenter_real_seed0.safetensors")
        metrics = score(model, test_data, cfg.segmenter, device)
        row = {"arm": arm, "ratio": ratio, "seed": seed, "n_real": len(train_real) if arm != "synthetic" else 0,
               "n_synthetic": count, "mdice": round(metrics["mdice"], 5), "miou": round(metrics["miou"], 5),
               "seconds": round(time.perf_counter() - start, 1)}
        _append_result(results_path, row)
        logger.info("%s ×%g seed %d: mDice %.4f, mIoU %.4f", arm, ratio, seed, metrics["mdice"], metrics["miou"])
    return _read_results(results_path)


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
