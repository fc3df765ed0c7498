# Set-up and entry points. `make demo` and `make test` create or refresh .venv as needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
DOCS_STAMP := $(VENV)/.installed-docs
TORCH := torch==2.13.0
PYTEST_ARGS ?=
# Threads for torch (tests/conftest.py), OpenMP and MKL in the test targets, e.g. `make test THREADS=2`;
# idle OpenMP threads sleep rather than spin (same results; 7x faster at THREADS=2 on a busy machine).
THREADS ?= 1
TEST_ENV = OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) MODELSENSE_TEST_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE

.PHONY: venv demo test test-fast test-random lint bench bench-scale docs clean

venv: $(STAMP)

# torch first (pinned: a CPU build from local disk here; an open range would pull a CUDA build),
# then the package with its dev and distributed (Ray) extras.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[dev,distributed]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/modelsense demo --out demo_out --resume

test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

# ruff (the rules in pyproject.toml) over the package, its tests, benchmarks and examples.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples docs

# The suite in shuffled order (pytest-random-order: the modules and the tests in each); the header
# prints the seed, and PYTEST_ARGS=--random-order-seed=N repeats an order.
test-random: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -n 2 --random-order $(PYTEST_ARGS)

# Peer libraries the benchmarks compare against, installed without letting them replace torch.
$(BENCH_STAMP): $(STAMP)
	bash bench/install.sh $(PY)
	touch $(BENCH_STAMP)

# Every benchmark at its default size, each recorded by bench/record.py into bench/results/<name>.json
# (the documentation's "Measured numbers" page reads them). The 50,000-image scale run is separate
# (`make bench-scale`: the longest).
BENCHES ?= ensemble memorization influence curvature mpe representations memory cli_startup
bench: $(BENCH_STAMP)
	@for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/record.py $$b.py || exit 1; done

bench-scale: $(STAMP)
	$(PY) bench/record.py scale.py

# The documentation site into site/ (strict: a warning, e.g. a broken link or a docstring griffe cannot
# read, fails the build); the tutorials it shows are scripts under docs/tutorials/ that tests/test_docs.py runs.
$(DOCS_STAMP): $(STAMP)
	$(PIP) install --quiet -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo_out site .pytest_cache
