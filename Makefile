# The front door. `make demo` and `make test` work on a fresh Debian 12/13
# machine as root: they create the virtual environment, install what is
# missing (once: later runs reuse it) and run.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Rebuilt only when what the environment installs changes.
VENV_STAMP := $(VENV)/.splitpilot-installed
PYTEST_ARGS ?=

.PHONY: help demo test venv sysdeps proto proto-gate lint bench clean

help:
	@echo "make demo    - set up and run the main job end to end on the embedded default"
	@echo "make test    - set up everything (Debian packages too) and run the whole test suite"
	@echo "make bench   - run the benchmarks in bench/"
	@echo "make proto   - regenerate splitpilot/ (generated code) from proto/"
	@echo "make proto-gate - buf lint and buf breaking against the release in proto/BASELINE"
	@echo "make lint    - ruff over every package, the import layers (lint-imports), mypy (setup.cfg [mypy] files)"
	@echo "make clean   - remove the virtual environment and caches"

$(VENV_STAMP): setup.cfg pyproject.toml scripts/bootstrap-venv.sh
	scripts/bootstrap-venv.sh $(PYTHON) $(VENV)
	@touch $@

venv: $(VENV_STAMP)

sysdeps:
	@scripts/install-system-deps.sh

# The demo builds the mini-condor's node root with debootstrap (once; cached).
demo: $(VENV_STAMP)
	@scripts/install-system-deps.sh debootstrap
	$(BIN)/splitpilot demo

# The schema gate first: a lint finding or a breaking change fails `make test`.
test: sysdeps $(VENV_STAMP) proto-gate
	$(BIN)/python -m pytest $(PYTEST_ARGS)

proto-gate:
	@scripts/schema-gate.sh

bench: $(VENV_STAMP)
	@set -e; for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

proto: $(VENV_STAMP)
	$(BIN)/python tools/protogen.py

lint: $(VENV_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	$(BIN)/ruff check pilot broker condor_plugin submit apps tests bench tools
	$(BIN)/lint-imports --config setup.cfg
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache .mypy_cache .import_linter_cache build *.egg-info .cache/buf
