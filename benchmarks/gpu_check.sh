#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU (under 8 minutes):
#   benchmarks/gpu_check.sh OUTDIR
# 1. a virtual environment from PyPI wheels (torch with CUDA, triton, pytest), the
#    extension built into it (reused when present: GPU_CHECK_VENV, default .venv-gpu);
# 2. the CUDA tests: every Triton kernel against its reference on CUDA tensors (forward,
#    backward, double backward), opcheck, torch.compile, the batched penalties
#    (tests/test_ops_*.py, the cases whose id names cuda; TRITON_INTERPRET=0);
# 3. the ops, penalties and landscape benchmarks on CUDA (the cases whose id names cuda);
# 4. OUTDIR/summary.json and OUTDIR/summary.md (benchmarks/gpu_check_summary.py), beside
#    the raw junit XML, benchmark JSON and logs.
# Without a GPU (no nvidia-smi listing one, or FASTLAND_GPU_CHECK_NO_GPU=1) it prints one
# line and exits 0. Each step has its own time limit; a failed step is recorded in the
# summary and makes the exit status 1.
set -u
OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.."

if [ "${FASTLAND_GPU_CHECK_NO_GPU:-0}" = "1" ] || ! command -v nvidia-smi >/dev/null 2>&1 \
   || ! nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  echo "gpu_check: no NVIDIA GPU found (nvidia-smi lists none); nothing to do"
  exit 0
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VENV=${GPU_CHECK_VENV:-.venv-gpu}
PY=$VENV/bin/python
TORCH=${GPU_CHECK_TORCH:-torch==2.14.1}
STATUS=0
: > "$OUT/steps.txt"

step() {  # step NAME SECONDS CMD... : run with a time limit, log to OUT/NAME.log, record the status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - t0))" >> "$OUT/steps.txt"
  echo "gpu_check: $name rc=$rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || STATUS=1
  return $rc
}

nvidia-smi -L > "$OUT/gpu.txt" 2>&1
install() {
  [ -x "$PY" ] || python3 -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip "setuptools>=64" wheel || return 1
  "$PY" -m pip install -q "$TORCH" triton numpy pytest pytest-benchmark hypothesis || return 1
  OMP_NUM_THREADS=4 MAX_JOBS=8 "$PY" -m pip install -q -e . --no-build-isolation || return 1
  "$PY" -c "import torch, triton, fastland.ops, fastland._ext as e; assert torch.cuda.is_available(); \
assert e.extension_available(); print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
}
step install 300 install || { "$PY" benchmarks/gpu_check_summary.py "$OUT" 2>/dev/null; exit 1; }

export TRITON_INTERPRET=0
step tests 180 "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not aot" -k cuda \
  tests/test_ops_weighted_projection.py tests/test_ops_grid_combine.py tests/test_ops_grid_relative_loglik.py \
  tests/test_ops_backend.py --junitxml="$OUT/tests.xml"
step bench 150 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py benchmarks/bench_penalties.py \
  benchmarks/bench_landscape.py -k cuda --benchmark-only --benchmark-min-rounds=5 \
  --benchmark-json="$OUT/bench.json"
"$PY" benchmarks/gpu_check_summary.py "$OUT" || STATUS=1
exit $STATUS
