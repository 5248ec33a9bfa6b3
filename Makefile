# The two set-up commands of the README: `make repro` and `make test`.
# Both create .venv and install everything first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test test-all bench clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

## Run the whole DAG on the built-in synthetic dataset.
repro: install
	$(BIN)/dvc repro

## The test suite CI runs (slow end-to-end tests excluded; `make test-all` includes them).
test: install
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
