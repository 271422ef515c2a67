# Two commands set everything up on a fresh machine (Python 3.11, CPU or GPU):
#   make run    create .venv if missing, install the project, run `dvc repro`
#   make test   same install, then the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Stages call `python -m pipeline...`: put the venv first so DVC finds the right Python.
export PATH := $(abspath $(BIN)):$(PATH)
# pip's "no index page" warnings from local mirrors are noise, not news.
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: run test install lint params deps bench faults screenshots clean

# The stamp is newer than pyproject.toml once installed, so a second `make` installs nothing.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -e ".[dev]" 2> >(grep -v "^WARNING: Location" >&2)
	@touch $@

install: $(VENV)/.installed

# Warm stages (pipeline.cli.warm): each stage that builds a model runs in a process forked
# from one that has imported torch, Lightning, MLflow and Ray already (README, "Start-up").
run: install
	$(BIN)/python -m pipeline.cli.warm start
	PIPELINE_WARM=1 $(BIN)/dvc repro

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

# Rewrite params.yaml from conf/ exactly as DVC's Hydra integration does on `dvc exp run`.
params: install
	$(BIN)/pipeline params

# Rewrite each dvc.yaml stage's src/ deps as the files its command imports (a test checks them).
deps: install
	$(BIN)/pipeline deps

# dvc.lock is committed (DVC's convention: `dvc exp run` on a fresh clone then has a baseline and
# no "No file hash info" warnings). After changing src/, conf/ or params.yaml, regenerate it with
# the default pipeline and commit it; tests/test_dvc_lock.py says when it is out of date.
.PHONY: lock
lock: install
	$(BIN)/dvc repro

bench: install
	$(BIN)/python bench/overhead.py

# The reliability suite: every fault scenario (tests marked `fault`), tabulated in reports/faults.md.
faults: install
	$(BIN)/python bench/faults.py

# The README's screenshots of the MLflow UI and the HTML report (headless Chromium), into docs/img/.
screenshots: install
	$(BIN)/python bench/screenshots.py

clean:
	rm -rf outputs multirun lightning_logs .pytest_cache
