# Every target sets itself up first (idempotent), so a fresh clone needs only `make demo` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup demo test test-fast bench bench-peers lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/neurofed demo

test: setup
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) tests -m "not slow and not docker" -x -q

bench: setup
	$(PY) -m benchmarks.run_all

# Flower / NVIDIA FLARE side by side: a separate environment, never the kit's own .venv.
bench-peers: setup
	bash scripts/peer_env.sh
	$(PY) -m benchmarks.peer_compare

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
