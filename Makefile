# The two set-up commands of the README: `make repro` and `make test`.
# Both create .venv and install everything first (once; again when requirements.lock changes): exactly the
# versions and files (sha256) requirements.lock pins, so one commit installs one environment.
# `make lock` refreshes requirements.lock from pyproject.toml's ranges (uv; needs the registry).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install lock lint browser repro test test-all bench docs clean-venv

install: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --require-hashes --no-deps -r requirements.lock
	$(BIN)/python -m pip install --no-deps --no-build-isolation -e .
	touch $@

## Re-resolve pyproject.toml's dependency ranges into requirements.lock (every Python >= 3.10, every platform).
lock: install
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --universal --python-version 3.10 \
	  --custom-compile-command "make lock" -o requirements.lock

## Run the whole DAG on the built-in synthetic dataset.
repro: install
	$(BIN)/dvc repro

## Debian's Chromium for the web page's browser tests (a test tool's own browser download fails offline).
## Installed when missing and apt-get can (root); otherwise say plainly that those tests will be skipped.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
	  || echo "chromium could not be installed: the 3 browser tests will be skipped (apt-get install -y chromium)" >&2; \
	else echo "no /usr/bin/chromium: the 3 browser tests will be skipped; run 'sudo apt-get install -y chromium' to include them" >&2; fi

## The test suite CI runs (slow end-to-end tests excluded; `make test-all` includes them), browser tests included.
test: install browser
	$(BIN)/python -m pytest

test-all: install
	$(BIN)/python -m pytest -m ''

bench: install
	$(BIN)/python -m bench

## ruff (pyproject.toml's [tool.ruff]: pycodestyle, pyflakes, import order, bugbear) over the whole tree.
lint: install
	$(BIN)/ruff check .

## The documentation site (docs/, mkdocs.yml): built --strict (a broken link or anchor, or a page missing from the nav,
## fails), into a folder outside the repository by default (make docs SITE_DIR=site to keep it here).
SITE_DIR ?= $(or $(TMPDIR),/tmp)/captioning-pipeline-site
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE_DIR)

clean-venv:
	rm -rf $(VENV)
