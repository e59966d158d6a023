#!/usr/bin/env bash
# The prepared GPU check, for a lent GPU machine (H100/H200, no network): one call, <= 8 minutes.
#   bash benchmarks/gpu_check.sh            (OUT=dir to choose where results go)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh   (a CPU: every stage's entry point, nothing heavy)
#
# Stages, each with its own timeout (seconds), its full log teed to $OUT, and skipped (said so)
# when the time left in the 470 s budget is under its timeout; a failing stage never stops the
# rest. The timeouts add up to 530 s: the last stages (replay, verify curve) run when the earlier
# ones finish inside their margins, and are skipped first when they do not. $OUT holds at most
# 8 files:
#   summary.txt  one line a stage + the tails that matter     summary.json  the same, parsed
#   build.log    the CMake/pip build (and the fallback's)     tests.log     op tests + loop tests (pytest -ra)
#   bench.log    kernel benchmarks                             replay.log    trace replay + 8B verify curve
#   kernels_cuda_bfloat16.json  the kernel benchmark rows (written case by case)
#   replay_cuda.json            the replay rows (SmolLM2-shaped replay, Llama-8B-shaped verify curve)
#
#  stage            timeout  what
#  build                140  pip install -e . (CMake, CUDA for $PS_KERNELS_CUDA_ARCHS), fallback cpp_extension
#  op_tests              80  kv_rollback / tree_attention / draft_attention / tree_accept / cuda paths, hypothesis profile "gpu"
#  feature_tests         45  the attention features (window, soft-cap, sinks) in CUDA and Triton against a dense fp64
#                            formulation, split and unsplit; the step's attention plan (attention_plan, the CUDA
#                            *_planned ops and Triton with the plan's workspace)
#  loop_tests            95  the decoding loop on the GPU (test_engine.py -k on_cuda; llama + qwen3 archs): every drafter
#                            and tree kind against transformers, and the backends that ran asserted (automatic: CUDA,
#                            Triton attention from 32 query rows per KV head; and forced to Triton), fp32 + bf16;
#                            and generate(cuda_graph=True) (test_cuda_graph.py: the verify step captured per tree-size
#                            bucket and replayed) against transformers and the plain loop
#  loop_tests_triton     50  the whole loop forced to Triton (PS_KERNELS_BACKEND=triton) against transformers (llama)
#  bench_kernels         60  bench_kv_rollback (quick) + bench_kernels --quick bf16 against SDPA, with the feature
#                            cases: windowed tree attention against SDPA with the window's dense mask, soft-cap /
#                            sinks against transformers' eager attention and against our kernel without them
#  replay                35  benchmarks/replay_traces.py: the recorded SmolLM2 traces on a random SmolLM2-shaped target
#  verify_curve_8b       25  Llama-3-8B-shaped random target (bf16): verify cost N = 1..64 x prefix 512..4096
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 MAX_JOBS=${MAX_JOBS:-16} HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-gpu}
export PS_KERNELS_CUDA_ARCHS=${PS_KERNELS_CUDA_ARCHS:-9.0}
PY=${PY:-python3}
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET:-470}
START=$(date +%s)
STAGES=$(mktemp)
: > "$OUT/summary.txt"
log() { echo "== $(date +%T) [$(( $(date +%s) - START ))s] $*" | tee -a "$OUT/summary.txt"; }
PYTEST_TIMEOUT=""
$PY -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT="--timeout=60"

# stage NAME TIMEOUT LOG COMMAND...: run with its timeout, tee to $OUT/LOG, record rc and seconds
stage() {
  local name=$1 limit=$2 logf=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt "$limit" ]; then
    log "$name: SKIPPED (${left}s left of the ${BUDGET}s budget, stage needs ${limit}s)"
    echo -e "$name\tskipped\t0\t$logf" >> "$STAGES"
    return 0
  fi
  log "$name (timeout ${limit}s)"
  local t0=$(date +%s)
  echo "===== $name: $*" >> "$OUT/$logf"
  set -o pipefail
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$OUT/$logf" | tail -4
  local rc=$?
  set +o pipefail
  local dt=$(( $(date +%s) - t0 ))
  [ $rc -eq 124 ] && log "$name: TIMED OUT after ${dt}s" || log "$name: rc=$rc in ${dt}s"
  echo -e "$name\t$rc\t$dt\t$logf" >> "$STAGES"
  write_summary
}

write_summary() {
  $PY - "$STAGES" "$OUT" <<'EOF' 2>/dev/null
import json, re, sys
from pathlib import Path
stages_file, out = Path(sys.argv[1]), Path(sys.argv[2])
stages = []
for line in stages_file.read_text().splitlines():
    name, rc, secs, logf = line.split("\t")
    stages.append({"stage": name, "rc": None if rc == "skipped" else int(rc), "skipped": rc == "skipped",
                   "timed_out": rc == "124", "seconds": int(secs), "log": logf})
summary = {"stages": stages, "pytest": {}, "files": sorted(p.name for p in out.iterdir())}
for logf in ("tests.log",):
    p = out / logf
    if p.exists():   # pytest's final lines per run: "== 12 passed, 1 failed in 3.2s =="
        runs = re.findall(r"^=+ (.*(?:passed|failed|error|skipped).*) in [0-9.]+s", p.read_text(), re.M)
        fails = re.findall(r"^(?:FAILED|ERROR) (\S+)", p.read_text(), re.M)
        summary["pytest"][logf] = {"runs": runs, "failed": fails}
for name in ("kernels_cuda_bfloat16.json", "replay_cuda.json"):
    p = out / name
    if p.exists():
        try:
            data = json.loads(p.read_text())
            summary[name] = {"meta": data.get("meta"), "rows": len(data.get("rows", []))}
            if name == "replay_cuda.json":
                summary["replay"] = [r for r in data["rows"] if r.get("label") == "replay"]
        except ValueError as exc:
            summary[name] = f"unreadable: {exc}"
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
EOF
}

log "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "no nvidia-smi"; } | tee -a "$OUT/summary.txt"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1 | tee -a "$OUT/summary.txt"
$PY -c "import triton; print('triton', triton.__version__)" 2>&1 | tee -a "$OUT/summary.txt"

build() {
  if [ "$DRY" = 1 ]; then echo "dry run: build skipped"; return 0; fi
  rm -f ps_kernels/_C*.so
  if PS_KERNELS_REQUIRE_NATIVE=1 $PY -m pip install -q --no-deps --no-build-isolation -e . ; then
    echo "cmake build ok"
  else
    echo "cmake build FAILED; trying the torch.utils.cpp_extension fallback"
    $PY benchmarks/gpu_build_fallback.py && echo "fallback build ok" || echo "fallback build FAILED"
  fi
}
export -f build
export PY DRY
stage build 140 build.log bash -c build
export PYTHONPATH=$PWD:$PWD/python${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import ps_kernels; print(ps_kernels.backends())" 2>&1 | tee -a "$OUT/summary.txt"

PYTEST="$PY -m pytest -ra -q -p no:cacheprovider $PYTEST_TIMEOUT"
[ "$DRY" = 1 ] && PYTEST="$PYTEST --collect-only"
stage op_tests 80 tests.log bash -c "cd tests && $PYTEST test_kv_rollback.py test_tree_attention.py test_draft_attention.py test_tree_accept.py test_cuda_paths.py"
stage feature_tests 45 tests.log bash -c "cd tests && $PYTEST test_triton_attention_features.py test_attention_plan.py"
stage loop_tests 95 tests.log bash -c "cd tests && $PYTEST test_engine.py test_cuda_graph.py -k 'on_cuda and not qwen2 and not mistral'"
stage loop_tests_triton 50 tests.log bash -c "cd tests && PS_KERNELS_BACKEND=triton $PYTEST test_engine.py -k 'on_cuda_matches_hf and llama'"

if [ "$DRY" = 1 ]; then
  stage bench_kernels 60 bench.log bash -c "$PY benchmarks/bench_kv_rollback.py --help >/dev/null && $PY benchmarks/bench_kernels.py --help"
  stage replay 35 replay.log $PY benchmarks/replay_traces.py --help
  stage verify_curve_8b 25 replay.log $PY benchmarks/replay_traces.py --help
else
  stage bench_kernels 60 bench.log bash -c "$PY benchmarks/bench_kv_rollback.py --device cuda --dtype bfloat16 --quick; \
    $PY benchmarks/bench_kernels.py --device cuda --dtype bfloat16 --quick \
      --ops tree_attention,tree_attention_window,tree_attention_features,draft_attention,tree_accept,skinny_linear; \
    cp benchmarks/results/kernels_cuda_bfloat16.json '$OUT/' 2>/dev/null; true"
  stage replay 35 replay.log $PY benchmarks/replay_traces.py --device cuda --target smollm2 --runs 1 --warmup 1 \
    --split --out "$OUT/replay_cuda.json" --traces benchmarks/traces/smollm2_hybrid_auto.json \
    benchmarks/traces/smollm2_hybrid_dynamic16.json benchmarks/traces/smollm2_hybrid_dynamic64.json
  stage verify_curve_8b 25 replay.log $PY benchmarks/replay_traces.py --device cuda --target llama8b --no-replay \
    --out "$OUT/replay_cuda_8b.tmp.json"
  # one results file for both replays (the 8-file limit)
  $PY - "$OUT" <<'EOF' 2>/dev/null
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); a, b = out / "replay_cuda.json", out / "replay_cuda_8b.tmp.json"
if b.exists():
    base = json.loads(a.read_text()) if a.exists() else {"meta": {}, "rows": []}
    extra = json.loads(b.read_text())
    base["rows"] += extra["rows"]; base["meta_llama8b"] = extra["meta"]
    a.write_text(json.dumps(base, indent=1) + "\n"); b.unlink()
EOF
fi
write_summary
log "done in $(( $(date +%s) - START )) s; stages: $(cut -f1,2 "$STAGES" | tr '\t\n' '= ')"
rm -f "$STAGES"
