#!/usr/bin/env bash
# The whole GPU check in one command, for a machine with an NVIDIA GPU, its own torch and no network:
#
#   benchmarks/gpu_suite.sh OUTDIR
#
# 1. installs the package editable and offline (pip --no-index --no-deps: the machine's own torch,
#    triton and libraries), which builds duodiff_fast._C in place for the local GPU's architecture
#    (DUODIFF_FAST_BUILD=cuda) and maps the top-level kernels/ to duodiff_fast.kernels;
# 2. runs the whole test suite (what CI runs on the CPU, here on the GPU) with DUODIFF_REQUIRE_GPU=1:
#    a gpu-marked test that skips FAILS;
# 3. runs benchmarks/kernels.py and benchmarks/latency.py with --preset gpu-suite (budgets that fit);
# 4. writes every JSON and summary.md into benchmarks/results/ and OUTDIR, and prints the short table last.
#
# Each stage has a time cap so that the whole suite ends in under 9 minutes on an H100; a stage that
# fails or runs out of time is reported (the later stages still run) and the script exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "usage: benchmarks/gpu_suite.sh OUTDIR" >&2
  exit 2
fi
OUTDIR=$1
mkdir -p "$OUTDIR" benchmarks/results
RESULTS=benchmarks/results
LOG="$OUTDIR/gpu_suite.log"
: > "$LOG"
DEADLINE=${GPU_SUITE_SECONDS:-530}   # hard total, below the 9-minute limit
PY=${PYTHON:-$(command -v python3 || command -v python)}
STAGES=()
FAILED=0
MARK=$(mktemp)   # JSON files newer than this were written by this run

remaining() { echo $((DEADLINE - SECONDS)); }

# run_stage NAME CAP_SECONDS COMMAND...: run with a time cap (never past the deadline), log, record
run_stage() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt 20 ]; then
    STAGES+=("$name|not run|0|no time left before the ${DEADLINE}s deadline"); FAILED=1; return
  fi
  [ "$cap" -gt $((left - 10)) ] && cap=$((left - 10))
  echo "=== $name (cap ${cap}s) ===" | tee -a "$LOG"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$cap" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) status=ok note=""
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT; note="stopped after ${cap}s"; FAILED=1
  elif [ "$rc" -ne 0 ]; then status=FAILED; note="exit status $rc"; FAILED=1; fi
  STAGES+=("$name|$status|$took|$note")
}

# --- 0. the machine --------------------------------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite.sh: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2; exit 1
fi
CAP=$($PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_suite.sh: torch cannot use the GPU" >&2; exit 1; }
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$LOG"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$LOG"

# --- 1. the package, with _C for this GPU (pip, offline) -------------------------------------------
# The tree alone does not import as the package: kernels/ sits at the top level and only an install
# maps it to duodiff_fast.kernels (setup.py's package_dir). An editable install does that and builds
# _C in place; --no-index --no-deps --no-build-isolation fetch nothing and use the machine's torch.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
run_stage "install, build _C (sm_${CAP/./})" 240 env DUODIFF_FAST_BUILD=cuda TORCH_CUDA_ARCH_LIST="$CAP" \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY -m pip install --no-index --no-deps --no-build-isolation -e .
run_stage "check the package imports and _C has CUDA kernels" 30 $PY -c "
import importlib.metadata as m, torch, duodiff_fast, duodiff_fast.kernels, duodiff_fast._C as C, duodiff_fast._native as n
print('duodiff-fast', m.version('duodiff-fast'), 'from', duodiff_fast.__file__, '; kernels from', duodiff_fast.kernels.__file__)
print(C.build_info())
assert n.available() and n.cuda_available(), 'duodiff_fast._C has no CUDA kernels'"

# --- 2. the whole test suite on the GPU; a gpu test that skips is a failure -------------------------
# Everything CI checks on the CPU is checked here too, on this machine's torch and Triton: the tests
# that exercise a backend run on CUDA tensors here (tests/conftest.py's backend_device), the gpu-marked
# ones must not skip (DUODIFF_REQUIRE_GPU=1). A fresh machine compiles every Triton kernel the tests
# launch: pytest-xdist (in the GPU image) spreads the files over up to 8 processes when it is
# installed, one file per process at a time (--dist loadfile: a file's kernels compile once).
XDIST=""
if $PY -c "import xdist" 2>/dev/null; then
  NPROC=$(nproc); [ "$NPROC" -gt 8 ] && NPROC=8
  XDIST="-n $NPROC --dist loadfile"
fi
run_stage "the whole test suite (GPU tests may not skip)" 240 env DUODIFF_REQUIRE_GPU=1 \
  $PY -m pytest -q -p no:cacheprovider $XDIST --durations=10 tests

# --- 3. benchmarks ---------------------------------------------------------------------------------
run_stage "kernels.py --preset gpu-suite" 200 $PY benchmarks/kernels.py --preset gpu-suite --results-dir "$RESULTS"
LAT_BUDGET=$(( $(remaining) - 100 )); [ "$LAT_BUDGET" -gt 200 ] && LAT_BUDGET=200; [ "$LAT_BUDGET" -lt 30 ] && LAT_BUDGET=30
run_stage "latency.py --preset gpu-suite" 300 $PY benchmarks/latency.py --preset gpu-suite --budget "$LAT_BUDGET" \
  --no-progress --results-dir "$RESULTS"

# --- 4. results ------------------------------------------------------------------------------------
mapfile -t JSONS < <(find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$MARK" | sort)
rm -f "$MARK"
for f in "${JSONS[@]}"; do cp "$f" "$OUTDIR/"; done
SUMMARY="$OUTDIR/summary.md"
if [ "${#JSONS[@]}" -gt 0 ]; then
  DEV=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
  $PY -m duodiff_fast.bench.summary "${JSONS[@]}" --out "$SUMMARY" --out "$RESULTS/gpu_suite_summary_${DEV}.md" > /dev/null \
    || { echo "summary failed" >&2; FAILED=1; }
else
  echo "no result JSON was written" > "$SUMMARY"; FAILED=1
fi

echo
echo "stage | status | seconds | note"
for s in "${STAGES[@]}"; do echo "$s" | sed 's/|/ | /g'; done
echo "total ${SECONDS}s (deadline ${DEADLINE}s); results in $OUTDIR and $RESULTS"
echo
cat "$SUMMARY"
exit $FAILED
