# Every target sets itself up first (idempotent), so a fresh clone needs only `make demo` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# pytest's own script, not `python -m pytest`: -m would put the repository root on sys.path, and
# the suite runs without it so that a bare `import wire` fails instead of loading a second copy.
PYTEST := $(VENV)/bin/pytest

.PHONY: setup peer-env demo test test-fast bench bench-links bench-peers bench-peers-secagg soak lint clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/neurofed demo

# Flower's and NVIDIA FLARE's own environments (.cache/, never the kit's .venv; 1.5 min the first
# time): the tests that check FedAvg against Flower's reference and run the peer benchmark use them.
peer-env:
	@bash scripts/peer_env.sh

test: setup peer-env
	$(PYTEST) tests

test-fast: setup
	$(PYTEST) tests -m "not slow and not docker" -x -q

bench: setup
	$(PY) -m benchmarks.run_all

# Rounds over shaped links (a network namespace and tc-tbf veth per site; needs root), 10 sites:
# none / fp16 / int8 / int8-topk at 20 Mbit/s up, 100 Mbit/s down per site, bandwidth only, and
# Flower 1.42 under the same shaping in the same run (NVIDIA FLARE: why not, and its filters).
bench-links: setup peer-env
	$(PY) -m benchmarks.links --peers flower,flare

# The chaos soak (about 15 minutes; docs/operations.md): 5 sites, 20 rounds, one fault a round,
# after a fault-free run with the same seeds. Root gives it network namespaces and a tmpfs (the
# network-cut and full-disk faults; skipped, saying why, without). SELF_CHECK=1 disables the
# coordinator's resume and must fail; SOAK_ARGS passes more (e.g. --compression int8).
soak: setup
	$(PY) -m neurofed.launch.soak $(if $(SELF_CHECK),--self-check) $(SOAK_ARGS)

# Flower / NVIDIA FLARE side by side: a separate environment, never the kit's own .venv.
bench-peers: setup peer-env
	$(PY) -m benchmarks.peer_compare

# Secure aggregation side by side: neurofed --secure-aggregation against Flower's SecAggPlusWorkflow
# + secaggplus_mod, each next to its own plaintext FedAvg (10 sites, 2 rounds).
bench-peers-secagg: setup peer-env
	$(PY) -m benchmarks.peer_compare --peers flower --secure-aggregation --rounds 2 --name peer_compare_secagg

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/lint_imports.py

clean:
	rm -rf build *.egg-info .pytest_cache .ruff_cache
