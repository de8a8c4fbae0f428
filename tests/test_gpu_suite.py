"""bench/gpu_suite.py and bench/gpu_suite.sh work before a GPU is ever lent: the whole suite at the tiny geometry on
the CPU (every row present, finite positive numbers, FLOPs counted, MFU only with a known peak), the budget and the
device checks, and the shell wrapper's syntax (its CPU smoke run is ``slow``). Numbers are not checked for speed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cldm.model import ControlLDM

REPO = Path(__file__).resolve().parents[1]
SCRIPT, SHELL = REPO / "bench" / "gpu_suite.py", REPO / "bench" / "gpu_suite.sh"
# One timed step, no warm-up, two sampler steps, one thread (on a shared 2-core machine more threads only wait).
FAST = ["--tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--sample-repeats", "1", "--ddim-steps", "2",
        "--solver-steps", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("bench_gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)
    sys.modules.pop(spec.name, None)


def run_suite(suite, argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = suite.main(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def tiny_run(suite, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_suite") / "out.json"
    rc, table = run_suite(suite, [*FAST, "--json", str(path)])
    return rc, table, json.loads(path.read_text(encoding="utf-8"))


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_every_row_measured_on_cpu(suite, tiny_run):
    rc, table, data = tiny_run
    assert rc == 0
    assert [r["id"] for r in data["rows"]] == [item[0] for item in suite.PLAN]
    has_solver = "sampler" in inspect.signature(ControlLDM.sample).parameters
    for row in data["rows"]:
        if row["id"].startswith("dpmpp_2m") and not has_solver:
            assert row["status"].startswith("solver n/a"), row
            continue
        assert row["status"] == "ok", row
        for key in ("throughput", "step_ms", "batch_s", "peak_gib", "flops"):
            assert _positive(row[key]), (row["id"], key, row[key])
        assert row["timed"] == 1 and row["batch"] == 2
        assert row["mfu"] is None  # CPU: no peak known without --peak-tflops
        assert abs(row["throughput"] * row["batch_s"] - row["batch"]) < 1e-6
    rows = {r["id"]: r for r in data["rows"]}
    assert rows["deep-copy:fp32"]["flops"] > rows["copy-free:fp32"]["flops"]  # the deep-copy form runs more passes
    assert rows["copy-free:bf16"]["flops"] == rows["copy-free:fp32"]["flops"]  # counted once per kind of step
    assert data["table"] == table.strip() and data["header"]["peak_tflops"] is None
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(suite.PLAN)  # the column header and one line per row
    for row in data["rows"]:
        assert any(row["what"] in line and f"| {row['precision']} |" in line for line in lines), row["what"]
    assert all("n/a" in line for line in lines[1:])
    deep = [line for line in lines if "train deep-copy" in line]
    assert len(deep) == 2 and all("× images/s" in line for line in deep)  # the copy-free / deep-copy ratio


def test_mfu_with_a_given_peak(suite, tmp_path):
    rc, table = run_suite(suite, [*FAST, "--only", "copy-free:fp32", "--peak-tflops", "0.5",
                                  "--json", str(tmp_path / "o.json")])
    row, = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["rows"]
    assert rc == 0 and row["id"] == "copy-free:fp32" and _positive(row["mfu"])
    assert math.isclose(row["mfu"], row["flops"] / row["batch_s"] / 0.5e12)
    assert f"{100 * row['mfu']:.1f} %" in table


def test_spent_budget_skips_rows_with_a_note(suite, tmp_path):
    rc, table = run_suite(suite, [*FAST, "--budget-s", "0", "--json", str(tmp_path / "o.json")])
    data = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))
    assert rc == 0 and len(data["rows"]) == len(suite.PLAN)
    assert all(r["status"].startswith("skipped: budget") for r in data["rows"])
    assert len(data["notes"]) == len(suite.PLAN) and "note: copy-free:bf16: skipped" in table


def test_out_of_memory_is_a_row_and_the_suite_goes_on(suite, tmp_path, monkeypatch):
    measure_train = suite.measure_train

    def deep_copy_runs_out(row, variant, *args, **kwargs):
        if variant == "deep-copy":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return measure_train(row, variant, *args, **kwargs)

    monkeypatch.setattr(suite, "measure_train", deep_copy_runs_out)
    rc, table = run_suite(suite, [*FAST, "--only", "deep-copy:fp32,copy-free:fp32", "--json", str(tmp_path / "o.json")])
    rows = {r["id"]: r for r in json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["rows"]}
    assert rc == 0 and rows["deep-copy:fp32"]["status"] == "OOM" and rows["copy-free:fp32"]["status"] == "ok"
    assert "| train deep-copy | fp32 | 2 | – |" in table and "| OOM |" in table


def test_a_model_without_the_sampler_keyword_gives_solver_na(suite, tmp_path, monkeypatch):
    build_sample = suite.build_sample

    def without_solvers(*args, **kwargs):  # as ControlLDM.sample was before it took ``sampler``
        return {**build_sample(*args, **kwargs), "has_solver": False}

    monkeypatch.setattr(suite, "build_sample", without_solvers)
    rc, table = run_suite(suite, [*FAST, "--only", "dpmpp_2m:fp32", "--json", str(tmp_path / "o.json")])
    row, = json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["rows"]
    assert rc == 0 and row["status"].startswith("solver n/a") and row["throughput"] is None
    assert "solver n/a" in table


def test_peak_table_by_device_name(suite):
    assert suite.peak_tflops("NVIDIA H200", None)[0] == 989.0
    assert suite.peak_tflops("NVIDIA H100 PCIe", None)[0] == 756.0
    assert suite.peak_tflops("NVIDIA H100 80GB HBM3", None)[0] == 989.0
    assert suite.peak_tflops("NVIDIA A100-SXM4-80GB", None)[0] == 312.0
    assert suite.peak_tflops("NVIDIA A10G", None)[0] == 125.0
    assert suite.peak_tflops("Some Future GPU", None)[0] is None
    assert suite.peak_tflops("Some Future GPU", 123.0)[0] == 123.0


@pytest.mark.parametrize("device", ["nonsense", *([] if torch.cuda.is_available() else ["cuda"])])
def test_unusable_device_is_a_one_line_error(suite, capsys, device):
    assert suite.main(["--tiny", "--device", device]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--device {device!r}" in err


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_script_syntax():
    subprocess.run(["bash", "-n", str(SHELL)], check=True)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_shell_script_runs_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_SUITE_SKIP_PYTEST": "1", "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SHELL), *FAST, "--only", "copy-free:fp32"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    log = (tmp_path / "gpu_suite.log").read_text(encoding="utf-8")
    assert "skipped (GPU_SUITE_SKIP_PYTEST=1)" in log and "| train copy-free | fp32 |" in log
    row, = json.loads((tmp_path / "gpu_suite.json").read_text(encoding="utf-8"))["rows"]
    assert row["status"] == "ok" and _positive(row["throughput"])
