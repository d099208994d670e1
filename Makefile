# Two commands matter: `make demo` (the whole stack, paid calls end to end) and `make test`.
# Each does its own set-up: a virtualenv with the project installed, and anvil + solc from npm.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint devchain serve clean

# Tests only, last: the x402 SDK's sign-in-with-x client needs signinwithethereum, whose pins
# (web3<8, eth-account<0.14) pip cannot meet beside ours, so it goes in with --no-deps; it runs on
# ours, and its one missing dependency (abnf) is in the test extra. The gateway does not need it.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m pip install --quiet --no-deps 'signinwithethereum==5.0.2'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(BIN)/.installed node_modules/.installed

demo: setup
	$(BIN)/x402gw demo

# On every core, at most 4 (pytest-xdist): each worker has its own anvil, databases and key prefixes.
# One file or test alone: $(BIN)/python -m pytest tests/... (one process).
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses=4

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
