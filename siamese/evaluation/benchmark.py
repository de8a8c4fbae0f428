"""Does the synthetic data help my segmenter? The downstream benchmark of the paper's tables.

For each schedule (arm) and seed a segmenter (``siamese.evaluation.segmenter``) is trained and scored on the
held-out real test split (a ``tools.split`` output, or ``splits.json`` made once and reused):

* **real**: the real training split;
* **real+synthetic** at each ratio (``ratio × n_real`` synthetic pairs added, taken in a fixed seeded order): the
  ratio sweep, one row per (ratio, seed);
* **synthetic** only (as many synthetic pairs as the largest ratio uses);
* **pretrain-finetune**: the same synthetic pairs as ``synthetic``, then the real training pairs. Every schedule
  has the same optimiser budget, ``segmenter.steps`` steps of ``segmenter.batch_size`` pairs: this one spends
  ``round(pretrain_share × steps)`` of them on the synthetic pairs and the rest fine-tuning on the real ones (the
  same network, a fresh AdamW at the same lr); the ``steps`` column states both phases.

With ``filtered`` folders (``tools.filter_pairs`` outputs of the synthetic folders' pairs: every pair must be one
of theirs, by image digest) each schedule that uses synthetic pairs runs twice, on all the pairs (``pool`` = all)
and on the kept ones (``pool`` = filtered, as many as the ratio asks and the filter kept). Before anything is
trained the synthetic folders pass the provenance leak check (``siamese.evaluation.leaks``: a generator that saw a
test image is refused, pairs generated from a test mask are excluded and counted), every training set is checked
against the test split (``splits.check_no_leak``), and two files of one folder whose stems collide (``a.png``,
``a.jpg``: one pair name for two files), or one synthetic image given twice (pooled folders), are refused in one
line. Results go to ``results.csv`` one row per (arm, pool, ratio, seed), written as each run finishes, each with
the key of its inputs (the schedule, the digests of the pairs it trained and was scored on, the settings): a re-run
reuses a row only when its key matches, so changed data, schedule or settings recompute and never relabel old rows.
The metrics are mDice and mIoU over the test images (``metrics.mask_scores`` at threshold 0.5), reported as mean ±
std over seeds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
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
from siamese.evaluation.segmenter import predict, save_segmenter, train_segmenter
from siamese.evaluation.settings import ARMS, BenchmarkConfig, SegmenterConfig  # noqa: F401  (re-exported)
from siamese.evaluation.splits import RealSplit, check_no_leak, real_split

logger = logging.getLogger(__name__)

RESULTS = "results.csv"
COLUMNS = ("arm", "pool", "ratio", "seed", "n_real", "n_synthetic", "steps", "mdice", "miou", "seconds", "inputs")


@dataclass
class Inputs:
    """Everything a benchmark consumes, checked: the real split, the synthetic pairs that may join training (leak
    checked, in the fixed seeded order), what was dropped or accepted, and the digests that key every result."""

    split: RealSplit
    synthetic: list[Pair]
    excluded_test_masks: int = 0
    warnings: list[str] = field(default_factory=list)
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    filtered: list[Pair] = field(default_factory=list)  # the pairs a filter kept (pool "filtered"), same order rule

    def pool(self, name: str) -> list[Pair]:
        return self.filtered if name == "filtered" else self.synthetic

    def pool_digests(self, name: str) -> list[list[str]]:
        return self.filtered_digests if name == "filtered" else self.synthetic_digests

    @cached_property
    def train_digests(self) -> list[list[str]]:
        return _digests(self.split.train)

    @cached_property
    def test_digests(self) -> list[list[str]]:
        return _digests(self.split.test)

    @cached_property
    def synthetic_digests(self) -> list[list[str]]:
        return _digests(self.synthetic)

    @cached_property
    def filtered_digests(self) -> list[list[str]]:
        return _digests(self.filtered)


def _digests(pairs: Sequence[Pair]) -> list[list[str]]:
    return [[digest_file(p.image), digest_file(p.mask)] for p in pairs]


def _key(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _intensity(intensity: str) -> dict:
    """How the real images were decoded, in a key: absent for ``auto`` (the keys made before it could be chosen)."""
    return {} if intensity == "auto" else {"intensity": intensity}


def segmenter_key(train: Sequence[Sequence[str]], cfg: SegmenterConfig, seed: int, intensity: str = "auto") -> str:
    """The key of a segmenter's inputs: its training pairs (digests, in order, and how their images were decoded),
    its settings, its seed."""
    return _key({"train": list(map(list, train)), "segmenter": asdict(cfg), "seed": seed, **_intensity(intensity)})


def row_key(arm: str, ratio: float, seed: int, count: int, inputs: Inputs, cfg: SegmenterConfig, *,
            pool: str = "all", phases: tuple[int, int] | None = None, intensity: str = "auto") -> str:
    """The key of one result row: its schedule (arm, pool, pretrain-finetune's phases), the segmenter's inputs (real
    training pairs for the arms that use them, the first ``count`` synthetic pairs of the pool) and the test pairs
    it is scored on (and how the real images are decoded). A row whose key differs is recomputed."""
    synth = inputs.pool_digests(pool)[:count]
    if arm == "pretrain-finetune":
        assert phases is not None
        return _key({"arm": arm, "pool": pool, "ratio": float(ratio), "phases": list(phases),
                     "pretrain": segmenter_key(synth, replace(cfg, steps=phases[0]), seed),
                     "finetune": segmenter_key(inputs.train_digests, replace(cfg, steps=phases[1]), seed),
                     "test": inputs.test_digests, **_intensity(intensity)})
    train = (inputs.train_digests if arm != "synthetic" else []) + synth
    extra = {"pool": pool} if pool != "all" else {}  # keys of the all-pool rows as before the pools existed
    return _key({"arm": arm, "ratio": float(ratio), "segmenter": segmenter_key(train, cfg, seed),
                 "test": inputs.test_digests, **extra, **_intensity(intensity)})


def check_unique_stems(pairs: Sequence[Pair], what: str) -> None:
    """Refuse two images (or two masks) of one folder whose stems collide (``a.png`` and ``a.jpg``): a pair named by
    its stem would stand for two files (``siamese.data.split.real_pairs`` refuses two masks of one name)."""
    for kind in ("image", "mask"):
        seen: dict[tuple[str, str], Path] = {}
        for pair in pairs:
            path = getattr(pair, kind)
            other = seen.setdefault((os.path.abspath(path.parent), path.stem), path)
            if other != path:
                raise ValueError(f"{what}: {other} and {path} share the stem {path.stem!r}: one pair name would stand "
                                 f"for two {kind}s; rename or remove one")


def _pooled(pairs: Sequence[Pair], folders: Sequence[Path], what: str) -> list[Pair]:
    """``pairs`` named by their folder's path below the folders' common parent (two folders named ``real`` stay
    apart), each folder's stems checked; a pair given twice (a folder passed twice or copied, or a filtered copy beside
    its source: the same image and mask) is refused, it would weigh double; the same image under two different masks
    (an undertrained generator ignoring its mask) is kept, with a warning."""
    resolved = [Path(os.path.abspath(f)) for f in folders]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"{what}: a folder is given twice ({', '.join(map(str, folders))})")
    common = Path(os.path.commonpath([str(f) for f in resolved])) if len(resolved) > 1 else resolved[0].parent
    out, seen, images_seen, same_image = [], {}, {}, []
    for folder in resolved:
        label = "/".join(folder.relative_to(common).parts) or folder.name
        mine = [p for p in pairs if Path(os.path.abspath(p.image)).is_relative_to(folder)]
        check_unique_stems(mine, f"{what} {folder}")
        for pair in mine:
            named = replace(pair, name=f"{label}/{pair.name.split('/', 1)[-1]}")
            image = digest_file(pair.image)
            digest = (image, digest_file(pair.mask))
            if digest in seen:
                raise ValueError(f"{what}: {named.name} and {seen[digest]} are the same pair: pooled it would count "
                                 "twice (give each folder once; a tools.filter_pairs output goes to --filtered)")
            if image in images_seen:  # the same image under another mask: a generator that ignores its mask
                same_image.append((named.name, images_seen[image]))
            seen[digest] = images_seen[image] = named.name
            out.append(named)
    if same_image:
        logger.warning("%s: %d generated images are identical to one made from another mask (e.g. %s and %s): the "
                       "generator does not follow its masks; both pairs are kept", what, len(same_image),
                       *same_image[0])
    return out


def _filtered_pairs(filtered: Sequence[Path], synthetic: Sequence[Path], test: Sequence[Pair],
                    sources: Sequence[Pair], allow_leak: bool) -> list[Pair]:
    """The pairs of ``filtered`` folders, refused unless each is one of the synthetic folders' pairs."""
    report = check_synthetic(filtered, test, allow_leak=allow_leak)
    pairs = _pooled(report.pairs, filtered, "--filtered")
    known = {digest_file(p.image) for p in sources}
    stray = next((p for p in pairs if digest_file(p.image) not in known), None)
    if stray is not None:
        raise ValueError(f"--filtered: pair {stray.name} ({stray.image}) is none of the --synthetic pairs "
                         f"({', '.join(map(str, synthetic))}): give the tools.filter_pairs output of those folders")
    return pairs


def _seeded_order(pairs: list[Pair], seed: int) -> list[Pair]:
    return [pairs[i] for i in np.random.default_rng(seed).permutation(len(pairs))] if pairs else []


def prepare_inputs(real_root: str | Path, synthetic: Sequence[str | Path], out: str | Path, cfg: BenchmarkConfig, *,
                   allow_generator_leak: bool = False, filtered: Sequence[str | Path] = ()) -> Inputs:
    """The real split (``real_root``: a dataset, split here into ``out/splits.json``, or a ``tools.split`` output)
    and the synthetic pairs (and ``filtered`` ones), every check done before anything is written: real test pairs in
    the training side, synthetic pairs whose models saw a test image (``siamese.evaluation.leaks``), pairs without a
    resolvable source, colliding stems, filtered pairs that are not the synthetic folders'."""
    split = real_split(real_root, out, test_fraction=cfg.test_fraction, seed=cfg.split_seed,
                       group_regex=cfg.group_regex)
    check_unique_stems([*split.train, *split.test], f"the real data {real_root}")
    check_no_leak(split.train, split.test)
    report = check_synthetic(synthetic, split.test, allow_leak=allow_generator_leak) if synthetic else LeakReport([])
    pooled = _pooled(report.pairs, list(map(Path, synthetic)), "--synthetic") if synthetic else []
    needs_synth = any(arm != "real" for arm in cfg.arms)
    if needs_synth and not pooled:
        raise ValueError("the synthetic arms need --synthetic sampling folders with pairs from training masks")
    if filtered and not synthetic:
        raise ValueError("--filtered compares a filter's kept pairs with their source: give the --synthetic folders")
    inputs = Inputs(split, _seeded_order(pooled, cfg.split_seed), report.excluded_test_masks, list(report.warnings))
    if filtered:
        kept = _filtered_pairs(list(map(Path, filtered)), list(map(Path, synthetic)), split.test, pooled,
                               allow_generator_leak)
        inputs.filtered = _seeded_order(kept, cfg.split_seed)
    inputs.near_duplicates = near_duplicates(split.train, split.test)
    for train_name, test_name, corr in inputs.near_duplicates[:5]:
        inputs.warnings.append(f"near-duplicate: training image {train_name} and test image {test_name} correlate "
                               f"{corr:.3f} (≥ {NEAR_DUPLICATE_CORRELATION}: likely the same picture)")
    if len(inputs.near_duplicates) > 5:
        inputs.warnings.append(f"… {len(inputs.near_duplicates) - 5} more near-duplicate train/test pairs")
    split.save()
    return inputs


def load_pairs(pairs: Sequence[Pair], intensity: str | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(read_image_rgb(p.image, intensity), read_mask(p.mask)) for p in pairs]


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


def plan_runs(cfg: BenchmarkConfig, inputs: Inputs) -> list[dict]:
    """Every (arm, pool, ratio, seed) this configuration asks for, with its synthetic count and its key."""
    n_real, plan = len(inputs.split.train), []
    pools = ("all", "filtered") if inputs.filtered else ("all",)
    for pool in pools:
        for arm in cfg.arms:
            if arm == "real" and pool != "all":
                continue
            ratios = cfg.ratios if arm == "real+synthetic" else ((0.0,) if arm == "real" else (max(cfg.ratios),))
            for ratio in ratios:
                wanted = round(ratio * n_real) if arm != "real" else 0
                count = min(len(inputs.pool(pool)), wanted)
                if count < wanted:
                    logger.warning("%s ×%g (%s pairs): only %d synthetic pairs for the %d asked", arm, ratio, pool,
                                   count, wanted)
                phases = cfg.phases() if arm == "pretrain-finetune" else None
                steps = f"{phases[0]} synthetic + {phases[1]} real" if phases else str(cfg.segmenter.steps)
                for seed in range(cfg.seeds):
                    plan.append({"arm": arm, "pool": pool, "ratio": float(ratio), "seed": seed, "count": count,
                                 "phases": phases, "steps": steps,
                                 "key": row_key(arm, ratio, seed, count, inputs, cfg.segmenter, pool=pool,
                                                phases=phases, intensity=cfg.intensity)})
    return plan


def run_benchmark(real_root: str | Path, synthetic: Sequence[str | Path], out: str | Path, cfg: BenchmarkConfig, *,
                  device: str = "cpu", progress: bool = True, inputs: Inputs | None = None,
                  allow_generator_leak: bool = False, filtered: Sequence[str | Path] = ()) -> list[dict[str, str]]:
    """Train and score every (arm, pool, ratio, seed) whose row in ``out/results.csv`` is missing or was made from
    other inputs (its ``inputs`` key differs: other data, schedule or settings); returns the rows of this plan."""
    import time

    out = Path(out)
    if inputs is None:
        inputs = prepare_inputs(real_root, synthetic, out, cfg, allow_generator_leak=allow_generator_leak,
                                filtered=filtered)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "benchmark.json", {"config": asdict(cfg), "real": str(real_root),
                                               "synthetic": [str(s) for s in synthetic],
                                               "filtered": [str(f) for f in filtered], "split": inputs.split.origin},
                      indent=1)
    train_real, test = inputs.split.train, inputs.split.test
    plan = plan_runs(cfg, inputs)
    results_path = out / RESULTS
    old = _read_results(results_path)
    keys = {p["key"] for p in plan}
    kept = [r for r in old if r.get("inputs") in keys]
    if len(kept) < len(old):
        logger.info("%d rows of %s were made from other inputs or settings: dropped, not reused", len(old) - len(kept),
                    results_path)
        _write_results(results_path, kept)
    done = {r["inputs"] for r in kept}
    todo = [p for p in plan if p["key"] not in done]
    logger.info("%d real train / %d test pairs, %d synthetic pairs%s; %d runs (%d done): %s", len(train_real),
                len(test), len(inputs.synthetic), f" ({len(inputs.filtered)} filtered)" if inputs.filtered else "",
                len(plan), len(plan) - len(todo), ", ".join(_label(p) for p in todo))
    test_data = load_pairs(test, cfg.intensity) if todo else []
    real_data = load_pairs(train_real, cfg.intensity) if todo else []
    cache: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for n, run in enumerate(todo, 1):
        arm, pool, seed, count = run["arm"], run["pool"], run["seed"], run["count"]
        chosen = inputs.pool(pool)[:count]
        check_no_leak((train_real if arm != "synthetic" else []) + chosen, test)
        for i in range(count):
            if (pool, i) not in cache:
                cache[pool, i] = load_pairs([chosen[i]], cfg.intensity)[0]
        synth_data = [cache[pool, i] for i in range(count)]
        start = time.perf_counter()
        desc = f"[{n}/{len(todo)}] {_label(run)}"
        if arm == "pretrain-finetune":
            pre, fine = run["phases"]
            model = train_segmenter(synth_data, replace(cfg.segmenter, steps=pre), seed=seed, device=device,
                                    progress=progress, desc=f"{desc} (synthetic)")
            model = train_segmenter(real_data, replace(cfg.segmenter, steps=fine), seed=seed, device=device,
                                    progress=progress, desc=f"{desc} (real)", model=model)
        else:
            data = (real_data if arm != "synthetic" else []) + synth_data
            model = train_segmenter(data, cfg.segmenter, seed=seed, device=device, progress=progress, desc=desc)
        if arm == "real" and seed == 0:
            save_segmenter(model, cfg.segmenter, out / "segmenter_real_seed0.safetensors",
                           trained_on=segmenter_key(inputs.train_digests, cfg.segmenter, 0, cfg.intensity))
        metrics = score(model, test_data, cfg.segmenter, device)
        row = {"arm": arm, "pool": pool, "ratio": run["ratio"], "seed": seed,
               "n_real": len(train_real) if arm != "synthetic" else 0, "n_synthetic": count, "steps": run["steps"],
               "mdice": round(metrics["mdice"], 5), "miou": round(metrics["miou"], 5),
               "seconds": round(time.perf_counter() - start, 1), "inputs": run["key"]}
        _append_result(results_path, row)
        logger.info("%s: mDice %.4f, mIoU %.4f (%.0f s)", desc, metrics["mdice"], metrics["miou"], row["seconds"])
    rows = {r["inputs"]: r for r in _read_results(results_path)}
    return [rows[p["key"]] for p in plan if p["key"] in rows]


def _label(run: dict) -> str:
    pool = " filtered" if run.get("pool") == "filtered" else ""
    return f"{run['arm']}{pool} ×{float(run['ratio']):g} s{run['seed']}"


def summarise_results(rows: Sequence[dict[str, str]]) -> list[dict]:
    """Mean ± std over seeds per (arm, pool, ratio), in the order the rows first appear."""
    groups: dict[tuple[str, str, float], list[dict[str, str]]] = {}
    for row in rows:
        groups.setdefault((row["arm"], row.get("pool") or "all", float(row["ratio"])), []).append(row)
    table = []
    for (arm, pool, ratio), items in groups.items():
        dice = np.array([float(r["mdice"]) for r in items])
        iou = np.array([float(r["miou"]) for r in items])
        table.append({"arm": arm, "pool": pool, "ratio": ratio, "seeds": len(items), "n_real": int(items[0]["n_real"]),
                      "n_synthetic": int(items[0]["n_synthetic"]), "steps": items[0].get("steps") or "",
                      "mdice_mean": float(dice.mean()), "mdice_std": float(dice.std()), "miou_mean": float(iou.mean()),
                      "miou_std": float(iou.std()), "mdice_per_seed": dice.tolist(),
                      "seed_list": [int(r["seed"]) for r in items]})
    return table
