#!/usr/bin/env bash
# One-call GPU check, run from the repository root on a machine with a GPU, nvcc and torch:
# builds cgc._C (CPU + CUDA), runs the test suite (CUDA cases included), the CUDA benchmarks
# (with the device's copy bandwidth and matmul rate), and writes a markdown report to
# $OUT/gpu_results.md (logs beside it). Needs no network. Its stages are capped (build 150 s, tests
# 150 + 120 s, benchmarks 180 s, profile 60 s); a typical run (build about 40 s) fits in 10
# minutes. A failed build is reported and the rest still runs (reference, Triton).
# Usage: OUT=/some/dir benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu_check_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
REPORT="$OUT/gpu_results.md"
export CGC_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# with a GPU visible torch builds for its architecture only (the fastest build)
section() { printf '\n## %s\n\n' "$1" >> "$REPORT"; }

{
  echo "# cgc GPU check"
  echo
  echo "- date: $(date -u +%FT%TZ), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  "$PY" -c "import torch, platform; print(f'- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else None}')"
  echo "- nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -1)"
} > "$REPORT" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

section "Build"
start=$(date +%s)
# --use-pep517: an older pip's legacy `setup.py develop` re-runs pip with build isolation
# (which needs the network); build_ext --inplace is the fallback without pip
# (38 s on 16 cores; both tries share one cap, so that a stuck build leaves time for the rest)
if timeout 150 bash -c '"$0" -m pip install --no-build-isolation --no-deps --use-pep517 -e . > "$1" 2>&1 ||
                        "$0" setup.py build_ext --inplace >> "$1" 2>&1' "$PY" "$OUT/build.log"; then
  echo "pip install -e . with CGC_CUDA=1: OK in $(( $(date +%s) - start )) s" >> "$REPORT"
else
  # the reference and Triton need no build: go on, so that the call still measures them
  echo "BUILD FAILED after $(( $(date +%s) - start )) s (the native backend is missing below); last lines:" >> "$REPORT"
  { echo '```'; tail -40 "$OUT/build.log"; echo '```'; } >> "$REPORT"
fi
"$PY" -c "import torch, cgc.ops.native as n; assert n.supports(torch.device('cuda')), 'no CUDA kernels'" >> "$REPORT" 2>&1

section "Tests (CUDA cases of the shared op suite, tests/test_native.py, tests/test_determinism.py, the transformers' attention, all of tests/test_triton.py at full shapes; CI runs the CPU ones)"
PYTHONUNBUFFERED=1 timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_native.py \
  tests/test_determinism.py tests/test_cam_methods.py tests/test_transformers.py tests/test_crops_and_class_negatives.py -rfs \
  -k cuda --tb=short > "$OUT/tests.log" 2>&1
echo "op suite + native + determinism: exit status $?" >> "$REPORT"
PYTHONUNBUFFERED=1 timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py -rfs \
  --tb=short >> "$OUT/tests.log" 2>&1
echo "exit status $?" >> "$REPORT"
{ echo '```'; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -30; echo '```'; } >> "$REPORT"

section "Benchmarks (CUDA)"
CGC_BENCH_ROUNDS=${CGC_BENCH_ROUNDS:-20} CGC_BENCH_TABLE="$OUT/bench_table.md" \
  CGC_BENCH_EXPLAIN_TABLE="$OUT/explain_table.md" timeout 180 "$PY" -m pytest benchmarks/ --benchmark-only -q -k cuda \
  --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
echo "exit status $?" >> "$REPORT"
if [ -f "$OUT/bench_table.md" ]; then cat "$OUT/bench_table.md" >> "$REPORT"; else tail -30 "$OUT/bench.log" >> "$REPORT"; fi
if [ -f "$OUT/explain_table.md" ]; then { echo; cat "$OUT/explain_table.md"; } >> "$REPORT"; fi

section "Distributed (NCCL, needs 2 GPUs: one process per GPU)"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -ge 2 ]; then
  timeout 120 "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node 2 -m cgc.train --epochs 1 --train-size 2048 --batch-size 64 --arch compact --norm group \
    --device cuda --out "$OUT/dist_run" > "$OUT/dist.log" 2>&1
  echo "2-GPU training run: exit status $?" >> "$REPORT"
else
  echo "skipped: $NGPU GPU(s) visible" >> "$REPORT"
fi

section "Kernel time vs host time (benchmarks/profile_ops.py)"
timeout 60 "$PY" benchmarks/profile_ops.py reference native triton > "$OUT/profile.log" 2>&1
echo "exit status $?; per-kernel tables in profile.log" >> "$REPORT"
grep "^===" "$OUT/profile.log" >> "$REPORT"

cat "$REPORT"
