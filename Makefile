# The two commands of the README: `make run` and `make test`. Everything a fresh machine
# needs (Python 3.11, pip and apt only) is installed from here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test check models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test,models,training]"
	touch $@ $(VENV)/.run-installed

## Serve the gateway on 127.0.0.1:8080 with the embedded backend and the dev token issuer.
run: $(VENV)/.run-installed
	$(BIN)/infergate serve --dev

## Install everything the tests need (redis-server, MLServer in its own venv) and run them all.
test: $(VENV)/.test-installed
	bash tools/test.sh

## Static checks only (ruff, mypy --strict, bandit).
check: $(VENV)/.test-installed
	bash tools/test.sh --checks-only

## Rebuild every model of triton_repo/ from scratch (deterministic).
models: $(VENV)/.test-installed
	$(BIN)/python tools/build_models.py --out triton_repo

clean:
	rm -rf $(VENV) .venv-mlserver var .mypy_cache .ruff_cache .pytest_cache
