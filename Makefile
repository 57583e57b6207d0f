# Two commands on a fresh machine: `make run` and `make test` (ruff, then every test; `-m "not slow"`
# in PYTEST_ARGS skips the Inductor compile tests). `make setup` prepares .venv alone.
# `make test-shuffled`: the same suite in a random order (pytest-randomly), its seed printed first;
# SEED=n repeats an order. `make test` and CI keep file order (pyproject.toml: -p no:randomly).
# `make bench`: the in-process batching benchmark at its defaults (docs/BENCHMARKS.md, ~1 min on 2 cores).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-shuffled bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch from the pinned version first, so nothing pulls the CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

run: setup
	RUNPOD_LOG_LEVEL=INFO $(PY) handler.py --output_dir outputs

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

test-shuffled: setup
	$(PY) -m ruff check .
	$(eval SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' '))
	@echo "test order: seed $(SEED) (make test-shuffled SEED=$(SEED) repeats it)"
	$(PY) -m pytest -q tests -p randomly --randomly-seed=$(SEED) $(PYTEST_ARGS)

bench: setup
	$(PY) -m scripts.bench_batching

clean:
	rm -rf $(VENV) .cache outputs tmp
