# Two commands matter: `make demo` (the whole stack, paid calls end to end) and `make test`.
# Each does its own set-up: a virtualenv with the project installed, and anvil + solc from npm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint devchain serve clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(BIN)/.installed node_modules/.installed

demo: setup
	$(BIN)/x402gw demo

test: setup
	$(BIN)/python -m pytest

# The gates CI runs beside the tests: ruff (lint, import order), mypy --strict, import-linter
# (the import rules of ARCHITECTURE.md, contracts in pyproject.toml).
lint: setup
	$(BIN)/ruff check gateway settlement catalog tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports

devchain: setup
	$(BIN)/x402gw devchain

serve: setup
	$(BIN)/x402gw serve

clean:
	rm -rf $(VENV) node_modules var .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
