# All set-up happens here; `make test` and `make demo` call `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test test-fast lint format demo fmnist-data clean

setup: $(STAMP) fmnist-data

# Python must be allowed to cache the bytecode it compiles: where the environment sets
# PYTHONDONTWRITEBYTECODE (these machines do), every process would compile torch,
# torch._dynamo (imported by torchvision.ops) and deepspeed from source again at start,
# in each of the hundreds of processes the tests launch (BENCHMARKS.md has the cost).
unexport PYTHONDONTWRITEBYTECODE

# Re-runs only when the dependency lists change, so `make test` is fast once set up.
# --no-compile: byte-compiling all of torch at install costs more than it saves; Python
# compiles (and caches) only the modules that are imported, on first use.
$(STAMP): requirements.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-compile $(TORCH_PINS)
	$(PY) -m pip install -q --no-compile -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian's dataset-fashion-mnist: the real images for the demo and the benchmarks.
fmnist-data:
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	else \
		echo "note: $(FMNIST_DIR) is missing and apt-get is not usable; Fashion-MNIST tests will fail" >&2; \
	fi

# Two pytest-xdist workers (most tests wait on process start-ups, so two at once beat
# one). `loadscope` hands out one module or one test class at a time: tests sharing a
# fixture that trains something are a class, so it trains once; collection order starts
# those heavy classes first. (`loadgroup` would fit better, but pytest-xdist 3.8 ignores
# its groups under pytest 9.) One OpenMP thread per process: the two workers' trainers
# share the cores.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests

# The unit tests alone (no launches, no training runs): about a minute, for the edit loop.
test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow" -n 2 tests

# ruff's lint rules and formatter, configured in pyproject.toml; `make test` runs the
# same check (tests/test_lint.py).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The demo: real Fashion-MNIST shards (clean labels; the config adds seeded 40% symmetric
# noise at load time), NRD training, the clean test top-1 printed at the end.
DEMO_DATA := data/fmnist
demo: setup
	@if [ ! -f $(DEMO_DATA)/train/manifest.json ] || [ ! -f $(DEMO_DATA)/test/manifest.json ]; then \
		$(PY) tools/make_shards.py fashion-mnist --out $(DEMO_DATA) --force --quiet; fi
	$(PY) -m nrd_dist.train configs/fmnist_demo.yaml $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
