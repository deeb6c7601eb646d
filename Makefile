# The two commands a fresh machine needs: `make repro` (the study) and `make test` (every test).
# Each sets up .venv/ and the system pieces if they are missing, fetches the data, then runs its job.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rankclip-installed
# DVC stages call `rankclip` and `papermill` by name: the project's environment comes first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup data repro test test-nb test-py lab export docs
.DEFAULT_GOAL := test

# uv installs the locked environment, byte-compiled on both cores (measured in a fresh venv: 45 s, against 167 s for pip).
# Byte-compiling at install matters where PYTHONDONTWRITEBYTECODE is set (as on the CI machine): nothing is compiled later,
# and every process would compile PyTorch's modules again. pip does it where uv cannot reach an index.
$(STAMP): pyproject.toml requirements.lock scripts/setup-system.sh
	bash scripts/setup-system.sh
	test -x $(BIN)/python || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep '^uv==' requirements.lock)
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python -c requirements.lock -e '.[dev]' \
	  || $(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (rankclip)" >/dev/null
	$(BIN)/python -c "from rankclip.warm import install_kernel; install_kernel()"
	touch $@

setup: $(STAMP)

data: setup
	$(BIN)/rankclip fetch-data

# The prepared data first (seconds), then the plan: how many runs will train and how long they take on this machine
# (measured), written to runs/progress.json; every trained seed then prints run k of n and the time left.
repro: data
	$(BIN)/dvc repro prepare tokenizers
	$(BIN)/rankclip study estimate
	$(BIN)/dvc repro

# nbdev-test alone (every library notebook); `make test` does not run it: tests/test_docs.py executes each
# notebook once, in an execnb shell of the docs build's process (as nbdev-test does), and fails with the notebook's error.
test-nb: data
	$(BIN)/nbdev-test

# Two pytest-xdist workers on the two cores: much of the suite is single-threaded (kernels, imports, DVC, Papermill).
# A third worker was no faster (pytest 697, 789 and 803 s with three against 744 and 757 s with two, fresh clones of
# 24f33da-b370029 on the same machine).
# OMP_WAIT_POLICY=PASSIVE: PyTorch's idle OpenMP threads sleep instead of spinning, so the workers' threads share
# the cores (measured: two 2-thread trainings at once 5.3-5.9 s each passive, 8.8 s spinning, 3.4 s alone).
test-py: data
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: test-py

export: setup
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean

docs: data
	$(BIN)/python docs/build.py

lab: setup
	$(BIN)/jupyter lab --ip 127.0.0.1 --no-browser --allow-root
