"""The GPU suite's rows and report (``bench/gpu_suite.py``): one ``Row`` per measurement, the Markdown table (with the
copy-free ÷ deep-copy ratios) and the JSON file."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    """One measurement; numbers are None where not measured (see ``status``)."""

    id: str
    what: str
    precision: str
    batch: int
    unit: str  # images/s (training) or pairs/s (sampling)
    throughput: float | None = None
    step_ms: float | None = None  # a training step; for sampling, batch time / sampler steps
    batch_s: float | None = None  # median wall time of one step (training) or one sampled batch
    peak_gib: float | None = None
    flops: float | None = None  # per training step / per sampled batch, as executed
    mfu: float | None = None
    timed: int = 0
    wall_s: float = 0.0  # the whole measurement: FLOP counting and warm-up included, building the networks not
    status: str = "ok"


def fmt_num(value: float | None, fmt: str) -> str:
    return "–" if value is None or not math.isfinite(value) else format(value, fmt)


def markdown(header: dict, rows: list[Row]) -> str:
    lines = [f"GPU suite on {header['device_name']} ({header['device']}): torch {header['torch']}, "
             f"CUDA {header['cuda'] or '–'}, cuDNN {header['cudnn'] or '–'}; "
             f"peak bf16 {fmt_num(header['peak_tflops'], '.4g')} TFLOP/s ({header['peak_source']})",
             f"training: {header.get('train_model', '–')}; {header['resolution']}² (latent {header['latent']}), "
             f"checkpointing {'on' if header['checkpointing'] else 'off'}, AdamW fused "
             f"{header.get('adamw_fused', '–')}; fp32 matmul precision '{header['matmul_precision']}'",
             f"sampling: {header.get('sample_model', '–')}; step ms = batch time / sampler steps; "
             "MFU = counted FLOPs (recomputation included) / time / dense bf16 peak, for every precision",
             f"peak GiB: {header['memory']}; TFLOP: per training step / per sampled batch; "
             f"{header.get('wall_s', '–')} s in all", "",
             "| what | precision | batch | images/s or pairs/s | step ms | peak GiB | TFLOP | MFU "
             "| copy-free ÷ deep-copy | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_id = {r.id: r for r in rows}
    for r in rows:
        ratio = ""
        base = by_id.get(r.id.replace("deep-copy", "copy-free"))
        if r.id.startswith("deep-copy") and base and base.throughput and r.throughput:
            ratio = f"{base.throughput / r.throughput:.2f}× images/s"
            if base.peak_gib and r.peak_gib:
                ratio += f", {base.peak_gib / r.peak_gib:.2f}× peak"
        mfu = "n/a" if r.mfu is None and r.throughput else fmt_num(None if r.mfu is None else 100 * r.mfu, ".1f")
        mfu += " %" if r.mfu is not None else ""
        tflop = fmt_num(None if r.flops is None else r.flops / 1e12, ".3g")
        lines.append(f"| {r.what} | {r.precision} | {r.batch} | {fmt_num(r.throughput, '.2f')} "
                     f"| {fmt_num(r.step_ms, '.1f')} | {fmt_num(r.peak_gib, '.2f')} | {tflop} "
                     f"| {mfu} | {ratio} | {r.status} |")
    return "\n".join(lines)


def write_json(path: Path | None, header: dict, rows: list[Row], notes: list[str]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"header": header, "rows": [asdict(r) for r in rows], "notes": notes, "table": markdown(header, rows)}
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
