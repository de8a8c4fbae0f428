"""Is a generator worth its cost on this data? Several generators, each trained with ≥ 2 seeds, compared on one split.

A generator is a name and ≥ 2 sampling folders (``tools.inference`` outputs with ``provenance.json``), one per
independently seeded training. Everything is measured per folder and then aggregated across the generator's seeds:

* **mask fidelity**: the real-data segmenter (the benchmark's real arm, seed 0) segments every generated image, Dice
  against its conditioning mask (``fidelity.score_pairs``); optionally also the colour rule of the generated domain;
* **FID / KID** per folder against as many real training images (``quality``), when a feature tower is given;
* **downstream Dice** per schedule (``benchmark.run_benchmark``: real only, real + synthetic at each ratio,
  synthetic only, pretrain-finetune, and each again on the filter's kept pairs when filtered folders are given),
  mean ± std over all (generator seed × segmenter seed) runs, with the spread across generator seeds (std of the
  per-folder means) and across segmenter seeds (mean over folders of the std over segmenter seeds). Real only is
  trained once and is every generator's baseline;
* **training cost**: the training run behind each folder (its provenance names ``... run OUTPUT_DIR``), whose
  ``cost.jsonl`` (``siamese.run_dir.training_cost``) gives wall seconds and CPU / GPU hours.

The verdicts use the spread, not the means alone: a schedule **beats** real only when its mean − std exceeds real
only's mean + std, is **lower** when its mean + std is below real only's mean − std, and is otherwise **no gain**;
the best generator is the one whose best synthetic schedule scores highest, and the sentence says when it is within
its runner-up's spread. Picking the best of several schedules favours chance: a gain should hold across ratios.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ldm.fileio import atomic_path

import numpy as np

from siamese.data.provenance import read_provenance
from siamese.data.split import is_split_dataset
from siamese.evaluation.benchmark import BenchmarkConfig, load_pairs, prepare_inputs, run_benchmark, segmenter_key
from siamese.evaluation.features import ImageFile
from siamese.evaluation.fidelity import colour_rule, score_pairs, segmenter_rule
from siamese.evaluation.report import arm_label
from siamese.evaluation.segmenter import load_segmenter, save_segmenter, segmenter_trained_on, train_segmenter
from siamese.run_dir import training_cost

logger = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
RUN_RE = re.compile(r"^(?:Siamese-Diffusion|ControlNet) run (.+)$")  # tools.train's provenance record of a run


@dataclass(frozen=True)
class Generator:
    name: str
    folders: tuple[Path, ...]  # one sampling folder per training seed
    filtered: tuple[Path, ...] = ()  # tools.filter_pairs outputs of those folders, in the same order


def parse_named_folders(text: str, flag: str) -> tuple[str, tuple[Path, ...]]:
    """``NAME=FOLDER,FOLDER[,...]`` → (name, folders)."""
    name, sep, rest = text.partition("=")
    folders = tuple(Path(f.strip()) for f in rest.split(",") if f.strip())
    if not sep or not NAME_RE.match(name.strip()) or not folders:
        raise ValueError(f"{flag} {text!r}: expected NAME=FOLDER,FOLDER[,...] (NAME of letters, digits, _ . + -)")
    return name.strip(), folders


def check_generators(generators: Sequence[Generator]) -> None:
    """Each generator with ≥ 2 seeds (folders), unique names, no folder twice, its filtered folders aligned."""
    if not generators:
        raise ValueError("give at least one --generator NAME=FOLDER,FOLDER")
    names = [g.name for g in generators]
    if len(set(names)) < len(names):
        raise ValueError(f"--generator names must be unique, got {names}")
    seen: dict[Path, str] = {}
    for g in generators:
        if len(g.folders) < 2:
            raise ValueError(f"--generator {g.name}: needs ≥ 2 sampling folders from independently seeded trainings "
                             f"(got {len(g.folders)}): one seed has no spread")
        if g.filtered and len(g.filtered) != len(g.folders):
            raise ValueError(f"--filtered {g.name}: {len(g.filtered)} folders for its {len(g.folders)} sampling "
                             "folders; give one tools.filter_pairs output per folder, in the same order")
        for folder in (*g.folders, *g.filtered):
            key = folder.resolve()
            if key in seen:
                raise ValueError(f"{folder} is given twice ({seen[key]} and {g.name})")
            seen[key] = g.name
            if not (folder / "manifest.jsonl").is_file():
                raise FileNotFoundError(f"{folder}: no manifest.jsonl (not a tutorial_inference.py output?)")


def training_run(folder: Path) -> tuple[str | None, dict | None]:
    """(the training run named in ``folder``'s provenance, its recorded cost or None)."""
    provenance = read_provenance(folder)
    runs = [m.group(1) for r in (provenance.records if provenance else ()) if r.role == "trained"
            for m in [RUN_RE.match(r.what)] if m]
    for run in runs:
        if (Path(run) / "config.yaml").is_file():
            return run, training_cost(run)
    return (runs[0] if runs else None), None


def spread(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def _schedule_id(row: dict) -> tuple[str, str, float]:
    return row["arm"], row.get("pool") or "all", float(row["ratio"])


def schedule_label(arm: str, pool: str, ratio: float, steps: str = "") -> str:
    label = {"real": "real only", "synthetic": "synthetic only"}.get(arm) or arm_label({"arm": arm, "ratio": ratio})
    if arm == "pretrain-finetune" and steps:
        label += f" ({steps} steps)"
    return label + (" (filtered pairs)" if pool == "filtered" else "")


def downstream(rows_by_folder: Sequence[Sequence[dict]]) -> dict[tuple[str, str, float], dict]:
    """Per schedule: mean ± std over every (folder, segmenter seed) row, the spread across folders (generator seeds)
    and across segmenter seeds, the synthetic counts and the values."""
    groups: dict[tuple[str, str, float], list[list[dict]]] = {}
    for i, rows in enumerate(rows_by_folder):
        for row in rows:
            groups.setdefault(_schedule_id(row), [[] for _ in rows_by_folder])[i].append(row)
    out = {}
    for sid, per_folder in groups.items():
        per_folder = [items for items in per_folder if items]
        values = [float(r["mdice"]) for items in per_folder for r in items]
        means = [float(np.mean([float(r["mdice"]) for r in items])) for items in per_folder]
        seg_sd = float(np.mean([np.std([float(r["mdice"]) for r in items]) for items in per_folder]))
        out[sid] = {**spread(values), "generator_seed_sd": float(np.std(means)), "segmenter_seed_sd": seg_sd,
                    "folders": len(per_folder), "segmenter_seeds": max(len(items) for items in per_folder),
                    "n_synthetic": sorted({int(r["n_synthetic"]) for items in per_folder for r in items}),
                    "steps": per_folder[0][0].get("steps") or "", "values": values,
                    "label": schedule_label(*sid, per_folder[0][0].get("steps") or "")}
    return out


def versus(entry: dict, baseline: dict) -> str:
    """``beats`` / ``lower`` / ``no gain``: the ±1 std intervals apart, or not."""
    if entry["mean"] - entry["std"] > baseline["mean"] + baseline["std"]:
        return "beats"
    if entry["mean"] + entry["std"] < baseline["mean"] - baseline["std"]:
        return "lower"
    return "no gain"


def _fid_kid(extractor, real_images: list[ImageFile], folder: Path, count: int | None, progress: bool) -> dict:
    from siamese.evaluation import quality
    from siamese.evaluation.features import equal_count, read_run_images

    paths = [r.path for r in read_run_images(folder)]
    real_n, synth_n = equal_count(real_images, paths, count or min(len(real_images), len(paths)))
    real_f, synth_f = extractor.features(real_n, progress=progress), extractor.features(synth_n, progress=progress)
    subset = min(1000, max(2, len(real_n) // 2))
    kid = quality.kernel_inception_distance(real_f, synth_f, subsets=100, subset_size=subset)
    return {"fid": quality.frechet_distance(real_f, synth_f), "kid_mean": kid.mean, "kid_std": kid.std,
            "images": len(real_n)}


def _real_segmenter(bench_out: Path, inputs, cfg: BenchmarkConfig, device: str, progress: bool):
    path = bench_out / "segmenter_real_seed0.safetensors"
    key = segmenter_key(inputs.train_digests, cfg.segmenter, 0, cfg.intensity)
    if segmenter_trained_on(path) == key:
        return load_segmenter(path, device)
    model = train_segmenter(load_pairs(inputs.split.train, cfg.intensity), cfg.segmenter, seed=0, device=device,
                            progress=progress, desc="fidelity segmenter")
    save_segmenter(model, cfg.segmenter, path, trained_on=key)
    return model, cfg.segmenter


def compare_generators(real: str | Path, generators: Sequence[Generator], out: str | Path, cfg: BenchmarkConfig, *,
                       extractor=None, features: str | None = None, fid_count: int | None = None,
                       colour: bool = False, device: str = "cpu", progress: bool = True,
                       allow_generator_leak: bool = False) -> dict:
    """Measure every generator (module docstring); returns what ``comparison.json`` holds (tables: ``report``)."""
    out, real = Path(out), Path(real)
    if not is_split_dataset(real):
        raise ValueError(f"--real {real}: not a python -m tools.split output (train/, test/, splits.json); the "
                         "generators must have trained on its train/ side")
    check_generators(generators)
    synth_arms = tuple(a for a in cfg.arms if a != "real")
    if not synth_arms:
        raise ValueError("--arms names no schedule with synthetic pairs: nothing to compare")
    real_cfg, synth_cfg = replace(cfg, arms=("real",)), replace(cfg, arms=synth_arms)
    bench = out / "benchmark"
    # Every check (split, leaks, stems, filtered subsets) for every folder before the first segmenter trains.
    real_inputs = prepare_inputs(real, [], bench / "real", real_cfg)
    inputs = {(g.name, i): prepare_inputs(real, [folder], bench / g.name / f"seed{i}", synth_cfg,
                                          allow_generator_leak=allow_generator_leak,
                                          filtered=[g.filtered[i]] if g.filtered else [])
              for g in generators for i, folder in enumerate(g.folders)}
    logger.info("== real only (%d segmenter seeds)", cfg.seeds)
    real_rows = run_benchmark(real, [], bench / "real", real_cfg, device=device, progress=progress,
                              inputs=real_inputs)
    baseline = downstream([real_rows])[("real", "all", 0.0)]
    model, seg_cfg = _real_segmenter(bench / "real", real_inputs, cfg, device, progress)
    segment = segmenter_rule(model, seg_cfg, device)
    real_images = [ImageFile(p.image, cfg.intensity) for p in real_inputs.split.train]  # decoded as benchmarked
    result: dict = {"real": str(real), "split": real_inputs.split.origin,
                    "n_train": len(real_inputs.split.train), "n_test": len(real_inputs.split.test),
                    "segmenter": {**vars(cfg.segmenter), "seeds": cfg.seeds}, "ratios": list(cfg.ratios),
                    "pretrain_phases": list(cfg.phases()) if "pretrain-finetune" in cfg.arms else None,
                    "features": features, "baseline": baseline, "generators": {}}
    for g in generators:
        folders, rows_by_folder = [], []
        for i, folder in enumerate(g.folders):
            logger.info("== %s seed %d: %s", g.name, i, folder)
            filt = [g.filtered[i]] if g.filtered else []
            rows = run_benchmark(real, [folder], bench / g.name / f"seed{i}", synth_cfg, device=device,
                                 progress=progress, inputs=inputs[(g.name, i)], filtered=filt)
            rows_by_folder.append(rows)
            scores = [s.dice for s in score_pairs(folder, segment)]
            entry: dict = {"folder": str(folder), "filtered": str(filt[0]) if filt else None,
                           "pairs": len(scores), "fidelity": float(np.mean(scores)),
                           "excluded_test_masks": inputs[(g.name, i)].excluded_test_masks}
            if colour:
                entry["fidelity_colour_rule"] = float(np.mean([s.dice for s in score_pairs(folder, colour_rule)]))
            if extractor is not None:
                entry["quality"] = _fid_kid(extractor, real_images, folder, fid_count, progress)
            entry["run"], entry["cost"] = training_run(folder)
            folders.append(entry)
            logger.info("%s seed %d: fidelity %.3f%s", g.name, i, entry["fidelity"],
                        f", FID {entry['quality']['fid']:.2f}" if "quality" in entry else "")
        result["generators"][g.name] = _aggregate(folders, rows_by_folder, baseline)
    result["verdict"] = verdict(result)
    return result


def _aggregate(folders: list[dict], rows_by_folder: list[list[dict]], baseline: dict) -> dict:
    schedules = downstream(rows_by_folder)
    for entry in schedules.values():
        entry["vs_real"] = versus(entry, baseline)
    agg: dict = {"folders": folders, "fidelity": spread([f["fidelity"] for f in folders])}
    if all("fidelity_colour_rule" in f for f in folders):
        agg["fidelity_colour_rule"] = spread([f["fidelity_colour_rule"] for f in folders])
    if all("quality" in f for f in folders):
        agg["fid"] = spread([f["quality"]["fid"] for f in folders])
        agg["kid"] = spread([f["quality"]["kid_mean"] for f in folders])
    costs = [f["cost"] for f in folders]
    if all(costs):
        agg["cost"] = {"per_training_cpu_hours": spread([c["cpu_hours"] for c in costs]),
                       "per_training_gpu_hours": spread([c["gpu_hours"] for c in costs]),
                       "per_training_wall_seconds": spread([c["wall_seconds"] for c in costs]),
                       "total_cpu_hours": sum(c["cpu_hours"] for c in costs),
                       "total_gpu_hours": sum(c["gpu_hours"] for c in costs),
                       "devices": sorted({d for c in costs for d in c["devices"]})}
    agg["schedules"] = [{"arm": sid[0], "pool": sid[1], "ratio": sid[2], **entry} for sid, entry in schedules.items()]
    return agg


def _best(schedules: list[dict]) -> dict | None:
    synthetic = [s for s in schedules if s["arm"] != "real"]
    return max(synthetic, key=lambda s: s["mean"]) if synthetic else None


def verdict(result: dict) -> list[str]:
    """The plain sentences: which generator is best, and whether real + synthetic beats real only."""
    base = result["baseline"]
    ranked = sorted(((name, _best(g["schedules"])) for name, g in result["generators"].items() if g["schedules"]),
                    key=lambda item: -item[1]["mean"])
    lines = []
    if ranked:
        name, best = ranked[0]
        text = f"Best generator downstream: **{name}** (its best schedule, {best['label']}: mDice {_cell(best)})"
        if len(ranked) > 1:
            other, second = ranked[1]
            apart = best["mean"] - best["std"] > second["mean"] + second["std"]
            text += (f"; ahead of {other} ({second['label']}: {_cell(second)}) beyond the spread." if apart else
                     f", but within the spread of {other} ({second['label']}: {_cell(second)}): no generator is better "
                     "beyond the spread.")
        lines.append(text)
        fidelity = sorted(result["generators"].items(), key=lambda kv: -kv[1]["fidelity"]["mean"])
        lines.append("Best mask fidelity (real-data segmenter): " + ", ".join(
            f"{n} {_cell(g['fidelity'])}" for n, g in fidelity) + ".")
    for name, g in result["generators"].items():
        mixed = [s for s in g["schedules"] if s["arm"] in ("real+synthetic", "pretrain-finetune")]
        if not mixed:
            continue
        best = max(mixed, key=lambda s: s["mean"])
        wins = [s["label"] for s in mixed if s["vs_real"] == "beats"]
        if wins:
            lines.append(f"{name}: real + synthetic **beats** real only ({_cell(base)}) beyond the spread with "
                         f"{', '.join(wins)} (best {best['label']}: {_cell(best)}).")
        else:
            lower = [s["label"] for s in mixed if s["vs_real"] == "lower"]
            lines.append(f"{name}: **no gain** from real + synthetic over real only ({_cell(base)}) beyond the "
                         f"spread: the best, {best['label']}, reaches {_cell(best)}" +
                         (f"; lower beyond the spread: {', '.join(lower)}" if lower else "") + ".")
        pairs = {(s["arm"], s["ratio"]): s for s in g["schedules"] if s["pool"] == "all"}
        moved = [f"{s['label']} {_cell(s)} vs {_cell(pairs[(s['arm'], s['ratio'])])}" for s in g["schedules"]
                 if s["pool"] == "filtered" and (s["arm"], s["ratio"]) in pairs
                 and versus(s, pairs[(s["arm"], s["ratio"])]) != "no gain"]
        if any(s["pool"] == "filtered" for s in g["schedules"]):
            lines.append(f"{name}: filtered vs all pairs: " + (
                "different beyond the spread for " + "; ".join(moved) if moved else "no difference beyond the spread")
                + ".")
    return lines


# -- the report -------------------------------------------------------------------------------------------------------
def _cell(entry: dict | None, digits: int = 3) -> str:
    return "—" if entry is None else f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def _cost_cell(g: dict) -> str:
    c = g.get("cost")
    if c is None:
        return "not recorded (no cost.jsonl in the training run: trained before it was recorded?)"
    hours = " + ".join(f"{c[f'per_training_{k}_hours']['mean']:.3f} {k.upper()} h" for k in ("cpu", "gpu")
                       if c[f"total_{k}_hours"] > 0) or "0 h"
    return f"{hours} per training ({c['per_training_wall_seconds']['mean']:.0f} s wall; {', '.join(c['devices'])})"


def comparison_markdown(result: dict) -> list[str]:
    seg, names = result["segmenter"], list(result["generators"])
    phases = result.get("pretrain_phases")
    lines = ["# Generator comparison", "", *[text for line in result["verdict"] for text in (line, "")],
             f"Real data `{result['real']}`: {result['n_train']} train / {result['n_test']} test pairs "
             f"({result['split']}). Segmenter {seg['network']}, {seg['steps']} steps of batch {seg['batch_size']}, "
             f"{seg['resolution']}² inputs, {seg['seeds']} seeds per schedule and generator seed"
             + (f"; pretrain-finetune: {phases[0]} steps on the synthetic pairs, then {phases[1]} on the real ones "
                "(the same budget)" if phases else "") + f". Wall time {result.get('seconds', 0):.0f} s.", "",
             "## Per generator (mean ± std across its training seeds)", ""]
    colour = all("fidelity_colour_rule" in g for g in result["generators"].values())
    head = "| generator | seeds | mask fidelity (real-data segmenter) |" + (" colour rule |" if colour else "")
    lines += [head + " FID | KID | training cost |", "|---" * (6 + colour) + "|"]
    for name, g in result["generators"].items():
        lines.append(f"| {name} | {len(g['folders'])} | {_cell(g['fidelity'])} |"
                     + (f" {_cell(g['fidelity_colour_rule'])} |" if colour else "")
                     + f" {_cell(g.get('fid'), 2)} | {_cell(g.get('kid'), 4)} | {_cost_cell(g)} |")
    if result["features"] is None:
        lines += ["", "FID/KID skipped: they need --inception PATH or --features SPEC --feature-weights PATH."]
    else:
        lines += ["", f"FID/KID per folder against as many real training images, features: {result['features']}."]
    lines += ["", "## Downstream mDice per schedule (held-out real test split)", "",
              "Mean ± std over every (generator seed × segmenter seed) run; in brackets the spread across generator "
              "seeds (g) and across segmenter seeds (s), and the synthetic pairs used. \"vs real\": beats / lower = "
              "the ±1 std intervals apart; no gain = they overlap.", "",
              "| schedule | " + " | ".join(f"{n} | vs real" for n in names) + " |", "|---" * (1 + 2 * len(names)) + "|"]
    base = result["baseline"]
    lines.append("| real only | " + " | ".join(f"{_cell(base)} (s {base['segmenter_seed_sd']:.3f}) | —"
                                              for _ in names) + " |")
    by_label: dict[str, dict[str, dict]] = {}
    for name, g in result["generators"].items():
        for entry in g["schedules"]:
            by_label.setdefault(entry["label"], {})[name] = entry
    for label, entries in by_label.items():
        cells = []
        for name in names:
            e = entries.get(name)
            cells.append("— | —" if e is None else
                         f"{_cell(e)} (g {e['generator_seed_sd']:.3f}, s {e['segmenter_seed_sd']:.3f}; "
                         f"{'/'.join(map(str, e['n_synthetic']))} pairs) | {e['vs_real']}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Per folder", "", "| generator | folder | pairs | fidelity | FID | training run | wall s |",
              "|---|---|---|---|---|---|---|"]
    for name, g in result["generators"].items():
        for f in g["folders"]:
            fid = f"{f['quality']['fid']:.2f}" if "quality" in f else "—"
            wall = f"{f['cost']['wall_seconds']:.0f}" if f["cost"] else "—"
            lines.append(f"| {name} | `{f['folder']}` | {f['pairs']} | {f['fidelity']:.3f} | {fid} | "
                         f"`{f['run'] or '?'}` | {wall} |")
    return [*lines, "", "![comparison](comparison.png)"]


def comparison_plot(result: dict, path: Path) -> Path:
    """mDice per schedule, one bar per generator (± std over generator × segmenter seeds, each run a dot), real
    only as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["generators"])
    labels = list(dict.fromkeys(e["label"] for g in result["generators"].values() for e in g["schedules"]))
    x, width = np.arange(len(labels)), 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(2.5 + 1.3 * len(labels), 4.0), dpi=120)
    base = result["baseline"]
    ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="0.85", zorder=0)
    ax.axhline(base["mean"], color="0.4", linestyle="--", label=f"real only {base['mean']:.3f}", zorder=1)
    low = base["mean"] - base["std"]
    for j, name in enumerate(names):
        entries = {e["label"]: e for e in result["generators"][name]["schedules"]}
        pos = x - 0.4 + width * (j + 0.5)
        means = [entries[lb]["mean"] if lb in entries else np.nan for lb in labels]
        stds = [entries[lb]["std"] if lb in entries else 0 for lb in labels]
        ax.bar(pos, means, width * 0.9, yerr=stds, capsize=3, label=name, zorder=2)
        for p, lb in zip(pos, labels):
            if lb in entries:
                ax.scatter([p] * len(entries[lb]["values"]), entries[lb]["values"], s=8, color="black", zorder=3)
                low = min(low, min(entries[lb]["values"]))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, [lb.replace(" (", "\n(") for lb in labels], fontsize=7)
    ax.set_ylabel("mDice on the real test split")
    ax.set_title("Downstream segmentation per schedule and generator", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
