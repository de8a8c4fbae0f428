"""Evaluation reports: the downstream table and its bar plot, written atomically.

Plots use matplotlib's Agg backend (files only, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldm.fileio import atomic_path, write_text_atomic


def arm_label(row: dict) -> str:
    if row["arm"] == "real+synthetic":
        return f"real + synthetic ×{row['ratio']:g}"
    return row["arm"]


def benchmark_table(summary: Sequence[dict]) -> list[str]:
    """Markdown rows: arm, training pairs, mDice and mIoU (mean ± std over seeds), per-seed mDice."""
    lines = ["| training data | real pairs | synthetic pairs | seeds | mDice | mIoU | mDice per seed |",
             "|---|---|---|---|---|---|---|"]
    for row in summary:
        per_seed = ", ".join(f"{v:.4f}" for v in row["mdice_per_seed"])
        lines.append(f"| {arm_label(row)} | {row['n_real']} | {row['n_synthetic']} | {row['seeds']} | "
                     f"{row['mdice_mean']:.4f} ± {row['mdice_std']:.4f} | {row['miou_mean']:.4f} ± "
                     f"{row['miou_std']:.4f} | {per_seed} |")
    return lines


def benchmark_plot(summary: Sequence[dict], path: Path, title: str = "Downstream segmentation on held-out real data"
                   ) -> Path:
    """Bars of mDice and mIoU per arm with the spread over seeds (±1 std) and each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [arm_label(r) for r in summary]
    x = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(summary), 3.6), dpi=120)
    for offset, key, name in ((-0.18, "mdice", "mDice"), (0.18, "miou", "mIoU")):
        ax.bar(x + offset, [r[f"{key}_mean"] for r in summary], 0.34, yerr=[r[f"{key}_std"] for r in summary],
               capsize=3, label=name)
    for i, row in enumerate(summary):
        ax.scatter([x[i] - 0.18] * len(row["mdice_per_seed"]), row["mdice_per_seed"], s=9, color="black", zorder=3)
    low = min(min(r["miou_mean"] - r["miou_std"] for r in summary), min(min(r["mdice_per_seed"]) for r in summary))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("score on the real test split")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    return write_text_atomic(path, "\n".join(lines) + "\n")
