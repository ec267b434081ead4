# The two quickstart commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Tests share one local Ray; its auth is set deliberately (no token on a private test cluster).
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo lint test test-all test-fast bench

install: $(STAMP)

# The dev extra includes the demo extra (moto's local S3 server) and the onnx one. The runtime closure is
# constrained to cluster/requirements.lock, so tests run on exactly what the cluster image installs, whatever
# the index released since (to move a pin: install without `-c`, then `python cluster/lock.py`).
# uv installs the same closure as pip in well under half the time (torch pulls ~4 GB of CUDA wheels: under 2 min
# against ~3.5 min on a fresh 2-core machine, out of CI's budget); where uv cannot install it, pip does.
# Bytecode is compiled at install, as pip does: where PYTHONDONTWRITEBYTECODE is set (as on these machines)
# nothing caches it later, and every Python process (each Ray worker) compiled torch and Ray again (the suite
# took 47 min instead of 23).
UV_VERSION ?= 0.13.9
$(STAMP): pyproject.toml cluster/requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv==$(UV_VERSION) && \
	  $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -e '.[dev]' -c cluster/requirements.lock || \
	  $(BIN)/pip install --quiet -e '.[dev]' -c cluster/requirements.lock
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/clap demo --output demo_output

lint: $(STAMP)
	$(BIN)/ruff check .

# CI's command: the lint, then everything but the `slow` runs, so that a fresh 2-core machine finishes within
# its budget.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow" --durations=30

# Everything, the slow scale/fault/autoscaling runs included (about twice as long as `make test`).
test-all: $(STAMP)
	$(BIN)/pytest

test-fast: $(STAMP)
	$(BIN)/pytest -m "not integration and not e2e"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
