#!/usr/bin/env bash
# The GPU benchmark suite in one command, sized for a short GPU lease (8 minutes in all by default):
#   1. environment: nvidia-smi summary (if present), torch / CUDA / cuDNN versions;
#   2. the `gpu` tests (tests/test_gpu.py), under their own time limit;
#   3. bench/gpu_suite.py with the remaining time as its budget (extra arguments are passed on to it).
# Everything is logged to $OUT_DIR/gpu_suite.log and the results go to $OUT_DIR/gpu_suite.json.
#
#   bash bench/gpu_suite.sh                         # SD1.5 geometry on the accelerator
#   bash bench/gpu_suite.sh --only copy-free        # extra arguments go to bench/gpu_suite.py
#   GPU_SUITE_SKIP_PYTEST=1 bash bench/gpu_suite.sh --tiny --device cpu   # smoke run without a GPU
#
# Environment: OUT (output folder, default bench_out), GPU_SUITE_TOTAL_S (whole budget, default 480),
# GPU_SUITE_PYTEST_S (limit of the gpu tests, default 150), GPU_SUITE_SKIP_PYTEST=1 (skip them),
# PYTHON (interpreter; default: python, else python3).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-bench_out}"
TOTAL_S="${GPU_SUITE_TOTAL_S:-480}"
PYTEST_S="${GPU_SUITE_PYTEST_S:-150}"
SKIP_PYTEST="${GPU_SUITE_SKIP_PYTEST:-0}"
PY="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"
GRACE_S=45   # after the suite's soft budget: the row in progress, freeing memory, writing the table
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_suite.log"
JSON="$OUT_DIR/gpu_suite.json"
START=$SECONDS

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
section() { echo; echo "== $* ($(( SECONDS - START )) s elapsed, $(left) s left) =="; }

suite() {
  local pytest_rc=0 bench_rc=0 t budget
  section "environment"
  date -u '+%Y-%m-%d %H:%M:%S UTC'
  echo "repo: $(pwd), python: $PY, output: $OUT_DIR"
  if command -v nvidia-smi >/dev/null 2>&1; then
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv \
      || echo "nvidia-smi query failed"
    timeout 30 nvidia-smi || true
  else
    echo "nvidia-smi: not found"
  fi
  timeout 120 "$PY" -c 'import importlib.util, torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN",
      torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
      "| accelerator", torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None)
# training rows need einops; sampling rows omegaconf + open_clip; the gpu tests also deepspeed and Lightning
need = ("einops", "omegaconf", "open_clip", "cv2", "deepspeed", "pytorch_lightning")
print("missing packages:", ", ".join(m for m in need if importlib.util.find_spec(m) is None) or "none")' \
    || echo "torch version check failed"

  section "gpu tests: pytest -m gpu tests/test_gpu.py"
  if [[ "$SKIP_PYTEST" == "1" ]]; then
    echo "skipped (GPU_SUITE_SKIP_PYTEST=1)"
  else
    t=$(( $(left) - 120 < PYTEST_S ? $(left) - 120 : PYTEST_S ))   # leave the benchmark at least 2 minutes
    if (( t < 30 )); then
      echo "skipped: only $(left) s left"
    else
      timeout --kill-after=10 "$t" "$PY" -m pytest -m gpu -q tests/test_gpu.py || pytest_rc=$?
      (( pytest_rc == 124 || pytest_rc == 137 )) && echo "gpu tests: stopped at their ${t} s limit"
      echo "gpu tests: exit code $pytest_rc"
    fi
  fi

  section "benchmark: bench/gpu_suite.py $*"
  t=$(left)
  budget=$(( t - GRACE_S < 420 ? t - GRACE_S : 420 ))
  (( budget < 30 )) && budget=30
  # --budget-s and --json first: the same options in "$@" come later and win.
  timeout --kill-after=10 "$(( t > 60 ? t : 60 ))" \
    "$PY" bench/gpu_suite.py --budget-s "$budget" --json "$JSON" "$@" || bench_rc=$?
  (( bench_rc == 124 || bench_rc == 137 )) && echo "benchmark: stopped at the overall limit; $JSON holds the rows done"
  section "done: gpu tests exit code $pytest_rc, benchmark exit code $bench_rc; log $LOG, results $JSON"
  (( bench_rc != 0 )) && return "$bench_rc"
  return "$pytest_rc"
}

suite "$@" 2>&1 | tee "$LOG"
