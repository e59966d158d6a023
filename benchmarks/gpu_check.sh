#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (H100/H200, no network): build the CUDA
# extension, run the GPU tests (the ops, then the whole decoding loop on tiny random models
# against transformers' generate on the GPU), run the kernel benchmarks, write everything under
# $OUT (default benchmarks/results/gpu). Sized to finish within ~8 minutes. (The end-to-end
# bench on SmolLM2, `parallelspec bench --device cuda`, does not fit one call of the lent
# machine: the model's GGUF alone is 94 MB, over the 64 MiB a call may carry.)
#   bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 MAX_JOBS=${MAX_JOBS:-16} HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-dev}
export PS_KERNELS_CUDA_ARCHS=${PS_KERNELS_CUDA_ARCHS:-9.0}
PY=${PY:-python3}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
start=$(date +%s)
log "machine"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/summary.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/summary.txt"

log "build (CMake + Ninja via pip)"
rm -f ps_kernels/_C*.so
if PS_KERNELS_REQUIRE_NATIVE=1 $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1; then
  log "cmake build ok"
else
  log "cmake build FAILED (tail below); trying torch.utils.cpp_extension fallback"
  tail -30 "$OUT/build.log" | tee -a "$OUT/summary.txt"
  $PY benchmarks/gpu_build_fallback.py >> "$OUT/build.log" 2>&1 && log "fallback build ok" || { log "fallback build FAILED"; tail -40 "$OUT/build.log" | tee -a "$OUT/summary.txt"; }
  export PYTHONPATH=$PWD:$PWD/python
fi
$PY -c "import ps_kernels; print(ps_kernels.backends())" 2>&1 | tee -a "$OUT/summary.txt"

log "GPU tests"
(cd tests && timeout 300 $PY -m pytest -q -x -p no:cacheprovider --timeout=120 \
    test_kv_rollback.py test_tree_attention.py test_draft_attention.py test_tree_accept.py \
    2>&1 | tail -40) | tee "$OUT/tests.log" | tail -15 | tee -a "$OUT/summary.txt"

log "decoding loop on the GPU (tiny random models, greedy, against transformers on the GPU)"
(cd tests && timeout 150 $PY -m pytest -q -p no:cacheprovider --timeout=60 test_engine.py -k on_cuda \
    2>&1 | tail -30) | tee "$OUT/tests_engine.log" | tail -10 | tee -a "$OUT/summary.txt"

log "kernel benchmarks"
timeout 120 $PY benchmarks/bench_kv_rollback.py --device cuda --dtype bfloat16 2>&1 | tail -16 | tee -a "$OUT/summary.txt"
cp benchmarks/results/kv_rollback_cuda.json benchmarks/results/kv_rollback_cuda.png "$OUT/" 2>/dev/null
timeout 200 $PY benchmarks/bench_kernels.py --device cuda --dtype bfloat16 2>&1 | tail -40 | tee -a "$OUT/summary.txt"
cp benchmarks/results/kernels_cuda.json benchmarks/results/kernels_cuda.png "$OUT/" 2>/dev/null
log "done in $(( $(date +%s) - start )) s"
