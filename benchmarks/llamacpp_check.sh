#!/usr/bin/env bash
# llama.cpp as a peer, opt-in (not in CI): llama-cpp-python built from source with native flags,
# GGUF files converted from the same SmolLM2 weights by llama.cpp's own convert_hf_to_gguf.py, run
# greedy on the bench prompts next to our plain loop and default hybrid measured in the same run.
#
#   bash benchmarks/llamacpp_check.sh          # venv + build once (~20-30 min on 2 shared cores), then the runs
#   bash benchmarks/llamacpp_check.sh venv     # only the venv and the build
#
# Environment: WORK (default /tmp/llamacpp_check: the venv, the build tree, safetensors, GGUF files,
# logs), LLAMA_VENV (default $WORK/venv), PY (the project's python, default .venv/bin/python),
# LLAMACPP_PYTHON_VERSION (default 0.3.36), CMAKE_ARGS (default below), and more options
# of the roles: PREPARE_ARGS (e.g. "--prompts 2 --big"), LLAMA_ARGS (e.g. "--no-lookup --big"),
# OURS_ARGS (e.g. "--compiled plain_loop --big"), ROUNDS (default 2), OUT (the results directory,
# default benchmarks/results/llamacpp), REPORT_ARGS (e.g. "--name llama1b_shape_bf16").
# Only the 1B-shaped model, the engines interleaved in one process (llama-bench, our plain loop,
# transformers' generate; BIG_ARGS e.g. "--threads 1 --repeats 6 --name llama1b_shape_bf16_1thread"):
#   bash benchmarks/llamacpp_check.sh big
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-/tmp/llamacpp_check}"
LLAMA_VENV="${LLAMA_VENV:-$WORK/venv}"
PY="${PY:-$ROOT/.venv/bin/python}"
VERSION="${LLAMACPP_PYTHON_VERSION:-0.3.36}"
# Native build: -march=native through GGML_NATIVE; OpenMP threads; no multimodal library (not needed).
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAVA_BUILD=OFF -DCMAKE_BUILD_TYPE=Release}"
export WORK
mkdir -p "$WORK"

if [ ! -x "$LLAMA_VENV/bin/python" ] || ! "$LLAMA_VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
    python3 -m venv "$LLAMA_VENV"
    # the converter's needs (torch from the local CPU wheel, pinned: an open range may pull a CUDA build)
    "$LLAMA_VENV/bin/pip" install -q "torch==2.13.0" numpy safetensors sentencepiece transformers protobuf
    # the sdist, kept: it carries llama.cpp's convert_hf_to_gguf.py and the matching gguf-py
    mkdir -p "$WORK/src"
    [ -f "$WORK/src/llama_cpp_python-$VERSION.tar.gz" ] || \
        "$LLAMA_VENV/bin/pip" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/src"
    [ -d "$WORK/src/llama_cpp_python-$VERSION" ] || tar xzf "$WORK/src/llama_cpp_python-$VERSION.tar.gz" -C "$WORK/src"
    "$LLAMA_VENV/bin/pip" install -q "$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
    # built from the unpacked sdist, the build tree kept in $WORK/build (llama-bench is built from it below)
    echo "building llama-cpp-python $VERSION with CMAKE_ARGS=$CMAKE_ARGS"
    CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 "$LLAMA_VENV/bin/pip" install -v --no-cache-dir \
        -C build-dir="$WORK/build" "$WORK/src/llama_cpp_python-$VERSION" > "$WORK/build.log" 2>&1 \
        || { tail -40 "$WORK/build.log"; exit 1; }
fi
# llama-bench from the same build tree and flags (only its own sources compile)
if [ ! -x "$WORK/build/bin/llama-bench" ]; then
    cmake -S "$WORK/src/llama_cpp_python-$VERSION" -B "$WORK/build" $CMAKE_ARGS -DLLAMA_BUILD_TOOLS=ON > "$WORK/bench_build.log" 2>&1 \
        && nice -n 10 cmake --build "$WORK/build" --target llama-bench -j 2 >> "$WORK/bench_build.log" 2>&1 \
        || echo "llama-bench not built (see $WORK/bench_build.log); the runs go on without it"
fi
[ "${1:-}" = "venv" ] && exit 0
if [ "${1:-}" = "big" ]; then
    CHECK="$ROOT/benchmarks/llamacpp_check.py"
    export LLAMACPP_CHECK_COMMAND="BIG_ARGS='${BIG_ARGS:-}' bash benchmarks/llamacpp_check.sh big"
    nice -n 5 "$PY" "$CHECK" prepare --big
    nice -n 5 "$LLAMA_VENV/bin/python" "$CHECK" convert --converter "$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
    nice -n 5 "$PY" "$CHECK" big --llama-bench "$WORK/build/bin/llama-bench" --out "${OUT:-$ROOT/benchmarks/results/llamacpp}" ${BIG_ARGS:-}
    exit 0
fi

# the runs: prompts + transformers' reference (project venv), GGUF conversion (llama venv), then
# ROUNDS rounds alternating a llama.cpp process and ours (the first of the pair swapped every
# round), then the report
CONVERTER="$WORK/src/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
ROUNDS="${ROUNDS:-2}"
CHECK="$ROOT/benchmarks/llamacpp_check.py"
export LLAMACPP_CHECK_COMMAND="ROUNDS=$ROUNDS PREPARE_ARGS='${PREPARE_ARGS:-}' LLAMA_ARGS='${LLAMA_ARGS:-}' OURS_ARGS='${OURS_ARGS:-}' REPORT_ARGS='${REPORT_ARGS:-}' bash benchmarks/llamacpp_check.sh"
# an existing prompts.json is kept (prepare only adds the 1B-shaped model to it when --big asks)
nice -n 5 "$PY" "$CHECK" prepare ${PREPARE_ARGS:-}
nice -n 5 "$LLAMA_VENV/bin/python" "$CHECK" convert --converter "$CONVERTER"
rm -rf "$WORK/rounds"
for r in $(seq 0 $((ROUNDS - 1))); do
    llama_round() { nice -n 5 "$LLAMA_VENV/bin/python" "$CHECK" llama --round "$r" ${LLAMA_ARGS:-}; }
    ours_round() { nice -n 5 "$PY" "$CHECK" ours --round "$r" ${OURS_ARGS:-}; }
    if [ $((r % 2)) -eq 0 ]; then llama_round; ours_round; else ours_round; llama_round; fi
done
"$PY" "$CHECK" report --out "${OUT:-$ROOT/benchmarks/results/llamacpp}" ${REPORT_ARGS:-}
