#!/usr/bin/env bash
# One GPU check for a machine with a GPU and no network (the H200 image: torch, triton, nvcc, ninja,
# pytest-benchmark, compute-sanitizer). From the repository root:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT, else ./gpu_check_out
#
# Steps, each under its own limit (sum 420 s; a step past its limit gets SIGINT first, so pytest
# still writes its reports, then SIGKILL 15 s later):
#   build 85     the extension in place (no build isolation; on a machine without a GPU: the CPU
#                part into a scratch folder, leaving the tree's build alone)
#   info 15      python -m rga_kernels.info
#   tests 100    GPU: the kernel and module test files in full; no GPU: the CPU tests of the files
#                the GPU path touches (launch budget, Triton kernels under the interpreter)
#   memcheck 2x25  compute-sanitizer memcheck of one odd-sized relation op and RGA module fwd+bwd
#                (the fused branch's kernels) per GPU backend, with
#                PyTorch's caching allocator off (it would hide small out-of-bounds accesses)
#   bench 80     op and module benchmarks against the reference (speed-up, peak memory)
#   train_step 90  ResNet-50 / RGA-SC reference / fused eager / fused + CUDA graphs, batch 64, bf16
# Triton autotuning is off in every step (one fixed config): a tuning pass over every shape would
# not fit the time limits. Every step imports the in-place build (PYTHONPATH = the repository).
# OUT_DIR receives at most 3 files: summary.json (bench/gpu_summary.py), bench.json and
# logs.tar.gz (every step's log, tests.xml, train_step.json). Without a GPU the GPU-only steps are
# recorded as skipped, with the reason, and the rest runs: CI runs it that way.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
export RGA_TRITON_AUTOTUNE=0
GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
STEPS="$WORK/steps.txt"; : > "$STEPS"
T_START=$(date +%s)
# the time limit of each step, in seconds (their sum is checked by CI: at most 420)
declare -A LIMIT=([build]=85 [info]=15 [tests]=100 [memcheck_cuda]=25 [memcheck_triton]=25 [bench]=80 [train_step]=90)
LIMITS_TOTAL=0; for v in "${LIMIT[@]}"; do LIMITS_TOTAL=$((LIMITS_TOTAL + v)); done
echo "limits total=$LIMITS_TOTAL" >> "$STEPS"

step() {  # step NAME CMD...
  local name=$1 limit=${LIMIT[$1]}; shift 1
  local t0; t0=$(date +%s)
  echo "== $name (limit ${limit}s) =="
  timeout -s INT -k 15 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 )) limit=$limit" | tee -a "$STEPS"
  tail -n 4 "$WORK/$name.log"
}
skip() {  # skip NAME REASON
  echo "$1 skipped: $2" | tee -a "$STEPS"
}

if [ "$GPU" = 1 ]; then
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # only the visible GPU's architecture: the fastest build
    TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  step build env RGA_KERNELS_BUILD_CUDA=1 $PY setup.py build_ext --inplace
else
  step build env RGA_KERNELS_BUILD_CUDA=0 $PY setup.py build_ext --build-lib "$WORK/build_lib" \
    --build-temp "$WORK/build_tmp"
fi
step info $PY -m rga_kernels.info

if [ "$GPU" = 1 ]; then
  # RGA_EXPECT_CUDA_BUILD=1: a CUDA part that failed to build is a failure, not a skip
  step tests env RGA_EXPECT_CUDA_BUILD=1 $PY -m pytest -q -p no:cacheprovider -x --junitxml="$WORK/tests.xml" \
    tests/test_relation_embed.py tests/test_triton_kernels.py tests/test_branch_kernels.py tests/test_launches.py \
    tests/test_registration.py tests/test_rga_module.py
else
  step tests $PY -m pytest -q -p no:cacheprovider --junitxml="$WORK/tests.xml" \
    tests/test_launches.py tests/test_triton_kernels.py
fi

for backend in cuda triton; do
  if [ "$GPU" != 1 ]; then
    skip "memcheck_$backend" "needs a CUDA GPU"
  elif ! command -v compute-sanitizer >/dev/null 2>&1; then
    skip "memcheck_$backend" "compute-sanitizer is not on PATH"
  else
    step "memcheck_$backend" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
      --error-exitcode 1 $PY bench/sanitize_case.py "$backend"
  fi
done

if [ "$GPU" = 1 ]; then
  step bench env RGA_BENCH_ROUNDS=2 $PY -m pytest bench/bench_relation_embed.py bench/bench_rga_module.py \
    --benchmark-only -q -p no:cacheprovider -k "not launches and not train_step" \
    --benchmark-json="$WORK/bench.json"
  step train_step $PY bench/train_step.py "$WORK/train_step.json" --budget-s 80
else
  skip bench "needs a CUDA GPU (the CPU benchmarks are pytest bench/ --benchmark-only)"
  skip train_step "needs a CUDA GPU"
fi

echo "total seconds=$(( $(date +%s) - T_START ))" >> "$STEPS"
$PY bench/gpu_summary.py "$WORK" "$GPU" > "$OUT_DIR/summary.json"
summary_rc=$?
[ -f "$WORK/bench.json" ] && cp "$WORK/bench.json" "$OUT_DIR/bench.json"
tar -czf "$OUT_DIR/logs.tar.gz" -C "$WORK" --exclude build_lib --exclude build_tmp . 2>/dev/null
rm -rf "$WORK"
cat "$OUT_DIR/summary.json"
exit $summary_rc
