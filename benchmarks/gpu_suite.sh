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
# 3. runs benchmarks/kernels.py and benchmarks/latency.py with --preset gpu-suite (U-ViT), the DiT rows
#    (--preset dit-xl2, narrowed by flags) and the EDM rows (--preset edm-cifar10, narrowed by flags),
#    each benchmark with its own cap, its own --budget below that cap and its own JSON file;
# 4. writes every JSON and summary.md into benchmarks/results/ and OUTDIR, and prints the short table last.
#
# Each stage has a time cap so that the whole suite ends in under 9 minutes (DEADLINE 530 s); a stage
# that fails or runs out of time is reported (the later stages still run) and the script exits 1, as it
# does when a benchmark stage leaves no JSON. How the 530 s are split (caps; a stage never runs past
# the deadline, whatever its cap):
#   install + build _C   150 s   one architecture, all cores
#   import check          15 s
#   test suite           175 s   pytest-xdist over up to 8 processes
#   kernels.py            40 s   (--budget 25: no case starts after 25 s)
#   U-ViT latency         55 s   (--budget 30)
#   DiT-XL/2 latency      50 s   (--budget 25)
#   EDM CIFAR-10 latency  40 s   (no budget option: narrowed to 4 groups instead)
#                        ---
#                        525 s   + a few seconds of GPU checks and the summary
# These caps are guesses until a run's stage table (printed last) measures them: where a stage times
# out, narrow its flags rather than raise the total. GPU_SUITE_DRY_RUN=1 prints this plan (one
# "PLAN|name|cap|command" line per stage) and runs nothing: tests/bench/test_summary_and_suite.py
# checks it on a CPU.
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
DRY=${GPU_SUITE_DRY_RUN:-0}
EXPECTED=()      # the JSON file each benchmark stage must leave

remaining() { echo $((DEADLINE - SECONDS)); }

# run_stage NAME CAP_SECONDS COMMAND...: run with a time cap (never past the deadline), log, record
run_stage() {
  local name=$1 cap=$2; shift 2
  local left; left=$(remaining)
  if [ "$left" -lt 20 ]; then
    STAGES+=("$name|not run|0|no time left before the ${DEADLINE}s deadline"); FAILED=1; return
  fi
  [ "$cap" -gt $((left - 10)) ] && cap=$((left - 10))
  if [ "$DRY" = 1 ]; then printf 'PLAN|%s|%s|' "$name" "$cap"; printf '%q ' "$@"; echo; return; fi
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
if [ "$DRY" = 1 ]; then
  CAP=9.0; DEV=dry-run
else
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_suite.sh: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2; exit 1
fi
CAP=$($PY -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; print('%d.%d' % torch.cuda.get_device_capability())") || {
  echo "gpu_suite.sh: torch cannot use the GPU" >&2; exit 1; }
nvidia-smi -L | tee -a "$LOG"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda)" | tee -a "$LOG"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$LOG"
DEV=$($PY -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name()).strip('-').lower())")
fi

# --- 1. the package, with _C for this GPU (pip, offline) -------------------------------------------
# The tree alone does not import as the package: kernels/ sits at the top level and only an install
# maps it to duodiff_fast.kernels (setup.py's package_dir). An editable install does that and builds
# _C in place; --no-index --no-deps --no-build-isolation fetch nothing and use the machine's torch.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
run_stage "install, build _C (sm_${CAP/./})" 150 env DUODIFF_FAST_BUILD=cuda TORCH_CUDA_ARCH_LIST="$CAP" \
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" $PY -m pip install --no-index --no-deps --no-build-isolation -e .
run_stage "check the package imports and _C has CUDA kernels" 15 $PY -c "
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
run_stage "the whole test suite (GPU tests may not skip)" 175 env DUODIFF_REQUIRE_GPU=1 \
  $PY -m pytest -q -p no:cacheprovider $XDIST --durations=10 tests

# --- 3. benchmarks ---------------------------------------------------------------------------------
# Each benchmark's --budget sits well below its cap: a group not started by then is recorded as
# skipped and the JSON is still written (a stage killed at its cap writes none).
# bench_stage NAME CAP JSON COMMAND...: run_stage, and remember the JSON the stage must write.
bench_stage() {
  local name=$1 cap=$2 json=$3; shift 3
  EXPECTED+=("$name|$json")
  run_stage "$name" "$cap" "$@"
}
# (kernels.py names its file itself: kernels_<device>_<dtype>_<preset>.json, the same device slug as DEV)
bench_stage "kernels.py --preset gpu-suite" 40 "$RESULTS/kernels_${DEV}_bfloat16_gpu-suite.json" \
  $PY benchmarks/kernels.py --preset gpu-suite --budget 25 --results-dir "$RESULTS"
bench_stage "latency.py --preset gpu-suite (U-ViT)" 55 "$RESULTS/latency_${DEV}_gpu-suite.json" \
  $PY benchmarks/latency.py --preset gpu-suite --budget 30 --no-progress --results-dir "$RESULTS" \
  --out "$RESULTS/latency_${DEV}_gpu-suite.json"
# DiT-XL/2 at 256: DDIM 50 only, batch 8, base and DuoDiff t_s=300 on eager-bf16 and triton, ASE D1/D4,
# one graph row (batch 8); no AdaDiff (its shrinking batch is timed on the U-ViT rows).
bench_stage "latency.py --preset dit-xl2 (DiT)" 50 "$RESULTS/latency_${DEV}_dit-xl2-suite.json" \
  $PY benchmarks/latency.py --preset dit-xl2 --solvers ddim --ddim-steps 50 --batch-size 8 \
  --backends eager-bf16,triton --t-s 0,300 --repeats 3 --adadiff-thetas "" --methods ase --ase-schedules D1,D4 \
  --method-backends eager-bf16 --method-solvers ddim --graph-solvers ddim --graph-batches 8 --graph-t-s 0 \
  --budget 25 --no-progress --results-dir "$RESULTS" --out "$RESULTS/latency_${DEV}_dit-xl2-suite.json"
# EDM's DDPM++ vs the multistage U-Net on CIFAR-10: Heun N=10 (NFE 19), batch 32, reference and
# eager-bf16, eager and CUDA-graph groups (4 groups); torch.compile is left out (its compile alone
# takes minutes), run the full preset for it.
bench_stage "latency.py --preset edm-cifar10 (EDM)" 40 "$RESULTS/latency_${DEV}_edm-cifar10-suite.json" \
  $PY benchmarks/latency.py --preset edm-cifar10 --heun-steps 10 --batch-size 32 --backends reference,eager-bf16 \
  --repeats 3 --no-progress --results-dir "$RESULTS" --out "$RESULTS/latency_${DEV}_edm-cifar10-suite.json"

if [ "$DRY" = 1 ]; then
  for e in "${EXPECTED[@]}"; do echo "JSON|$e"; done
  rm -f "$MARK"; exit 0
fi
for e in "${EXPECTED[@]}"; do
  [ -f "${e#*|}" ] && [ "${e#*|}" -nt "$MARK" ] && continue
  STAGES+=("${e%%|*}|NO JSON|0|${e#*|} was not written"); FAILED=1
done

# --- 4. results ------------------------------------------------------------------------------------
mapfile -t JSONS < <(find "$RESULTS" -maxdepth 1 -name '*.json' -newer "$MARK" | sort)
rm -f "$MARK"
for f in "${JSONS[@]}"; do cp "$f" "$OUTDIR/"; done
SUMMARY="$OUTDIR/summary.md"
if [ "${#JSONS[@]}" -gt 0 ]; then
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
