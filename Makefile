# All set-up happens here; `make test` and `make demo` call `make setup` first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo fmnist-data clean

setup: $(STAMP) fmnist-data

# Python must be allowed to cache the bytecode it compiles: where the environment sets
# PYTHONDONTWRITEBYTECODE (these machines do), every process compiled torch, torch._dynamo
# (imported by torchvision.ops) and deepspeed from source again: `import nrd_dist.train`
# took 11-12 s instead of 4 s, in each of the hundreds of processes the tests launch.
unexport PYTHONDONTWRITEBYTECODE

# Re-runs only when the dependency lists change, so `make test` is fast once set up.
# --no-compile: byte-compiling all of torch at install took ~40 s of a ~2.5 min set-up
# here; Python compiles (and caches) only the modules that are imported, on first use.
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

# Two pytest-xdist workers. `loadscope` hands out one test module at a time, or one test
# class: tests that share a fixture which trains something are a class (e.g.
# test_checkpoint.py's), so that fixture runs once, in one worker, while the rest of its
# file runs in the other. Collection order (--no-loadscope-reorder) starts those heavy
# classes early instead of last. Most tests wait on process start-ups and launches, so
# two at once beat one; one file per worker (`loadfile`) left one worker with all of
# test_checkpoint.py (over 800 s of a 1,122 s run here). (`loadgroup` would be the
# natural fit, but pytest-xdist 3.8 cannot group under pytest 9: its groups are ignored.)
# One OpenMP thread per process: two workers, each starting trainers of its own, share 2
# cores (torchrun already does this for its ranks). With both changes a fresh clone's
# tests took 1,062 s here, against 1,122 s with `loadfile` and default threads; 512 s
# once bytecode was cached (above) and DeepSpeed's CPU shm kernels no longer compiled.
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder tests

# The demo: real Fashion-MNIST shards (clean labels; the config adds seeded 40% symmetric
# noise at load time), NRD training, the clean test top-1 printed at the end.
DEMO_DATA := data/fmnist
demo: setup
	@if [ ! -f $(DEMO_DATA)/train/manifest.json ] || [ ! -f $(DEMO_DATA)/test/manifest.json ]; then \
		$(PY) tools/make_shards.py fashion-mnist --out $(DEMO_DATA) --force --quiet; fi
	$(PY) -m nrd_dist.train configs/fmnist_demo.yaml $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
