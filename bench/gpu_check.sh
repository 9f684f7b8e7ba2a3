#!/usr/bin/env bash
# One GPU check for a machine with a GPU and no network (e.g. an H200 image with torch, triton,
# nvcc, ninja, pytest-benchmark and compute-sanitizer). Usage, from the repository root:
#
#     bash bench/gpu_check.sh [OUT_DIR]          # default OUT_DIR: $OUT or ./gpu_check_out
#
# Steps: build the extension in place (no build isolation), run the GPU tests, run
# compute-sanitizer memcheck over one small forward+backward per GPU backend, run the GPU
# benchmarks, and write OUT_DIR/summary.json (bench/gpu_summary.py). Each step has its own time
# limit so the whole check stays within about 6 minutes; a failing step is recorded, not fatal.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
# Only the visible GPU's architecture: the fastest build.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "9.0")
  export TORCH_CUDA_ARCH_LIST
fi
STATUS="$OUT_DIR/steps.txt"; : > "$STATUS"
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s) ==" | tee -a "$OUT_DIR/log.txt"
  timeout "$limit" "$@" >>"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t0 ))" | tee -a "$STATUS"
  tail -n 5 "$OUT_DIR/$name.log"
}

step build 180 env RGA_KERNELS_BUILD_CUDA=1 $PY setup.py build_ext --inplace
step info 60 $PY -m rga_kernels.info
cp "$OUT_DIR/info.log" "$OUT_DIR/info.txt" 2>/dev/null
# The kernel and module test files in full (their CUDA, bf16 and Triton cases run only here);
# RGA_EXPECT_CUDA_BUILD=1 turns a CUDA part that failed to build into a failure, not skips.
step tests 200 env RGA_EXPECT_CUDA_BUILD=1 $PY -m pytest -q -p no:cacheprovider \
  tests/test_relation_embed.py tests/test_registration.py tests/test_triton_kernels.py \
  tests/test_rga_module.py tests/test_models.py --junitxml="$OUT_DIR/tests.xml"
if command -v compute-sanitizer >/dev/null 2>&1; then
  for backend in cuda triton; do
    step "memcheck_$backend" 120 compute-sanitizer --tool memcheck --error-exitcode 1 \
      $PY bench/sanitize_case.py "$backend"
  done
else
  echo "memcheck skipped: no compute-sanitizer" | tee -a "$STATUS"
fi
step bench 200 env RGA_BENCH_ENFORCE=1 $PY -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$OUT_DIR/bench.json"
$PY bench/gpu_summary.py "$OUT_DIR" > "$OUT_DIR/summary.json"
cat "$OUT_DIR/summary.json"
