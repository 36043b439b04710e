#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: build r3mes (CPU + CUDA modules), run the CUDA tests
# (parity, poisoned outputs, compute-sanitizer memcheck, the GPU backend) and the CUDA
# benchmarks (kernels, 2B-4T-shaped decode), and copy
# every log to $OUT (default ./gpu_check_out). Run from the repository root:
#
#     OUT=/tmp/out bash scripts/gpu_check.sh
#
# Exit status: non-zero if the build or the tests failed (the benchmark still runs).
set -u -o pipefail
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
status=0

{
  nvidia-smi || true
  nvcc --version || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} > "$OUT/device.txt" 2>&1

if ! "$PY" -m pip install --no-build-isolation -v . > "$OUT/build.log" 2>&1; then
  echo "build failed: see $OUT/build.log"; tail -50 "$OUT/build.log"; exit 1
fi
"$PY" -c "from r3mes.kernels import cuda; print(cuda.info())" > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"

# Run from outside the checkout so the installed (built) package is the one imported.
REPO="$PWD"
cd "$OUT"
"$PY" -m pytest "$REPO/tests/cuda" -q -rs -p no:cacheprovider --rootdir "$REPO" \
  > "$OUT/tests_cuda.log" 2>&1 || status=1
tail -25 "$OUT/tests_cuda.log"

"$PY" -m pytest "$REPO/benchmarks/bench_cuda.py" --benchmark-only -q -p no:cacheprovider \
  --rootdir "$REPO" --table-out "$OUT/bench_cuda.md" --benchmark-json "$OUT/bench_cuda.json" \
  > "$OUT/bench_cuda.log" 2>&1 || status=1
cat "$OUT/bench_cuda.md" 2>/dev/null || tail -40 "$OUT/bench_cuda.log"

# Decode tok/s of the 2B-4T-shaped model on the GPU backend path (0/3 experts, eager/graph).
"$PY" -m pytest "$REPO/benchmarks/bench_cuda_decode.py" --benchmark-only -q -p no:cacheprovider \
  --rootdir "$REPO" --table-out "$OUT/bench_cuda_decode.md" \
  --benchmark-json "$OUT/bench_cuda_decode.json" > "$OUT/bench_cuda_decode.log" 2>&1 || status=1
cat "$OUT/bench_cuda_decode.md" 2>/dev/null || tail -40 "$OUT/bench_cuda_decode.log"
exit $status
