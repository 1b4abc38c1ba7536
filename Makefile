# The two commands of the README: `make run` and `make test`. Everything a fresh machine
# needs (Python 3.11, pip and apt only) is installed from here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

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

## Rebuild every model of triton_repo/ from scratch (deterministic): version 1 of each model
## (scikit-learn) and the DP-SGD version 2 of digits and risk (Opacus, seeded).
models: $(VENV)/.test-installed
	$(BIN)/python tools/build_models.py --out triton_repo

## Benchmarks: per-stage CPU (pytest-benchmark), then the side-by-side HTTP harness.
## Installs wrk and nginx-light (Debian) if missing; prints tables, writes bench/results/.
bench: $(VENV)/.test-installed
	@command -v wrk >/dev/null && command -v nginx >/dev/null || \
	  { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq wrk nginx-light redis-server; }
	$(BIN)/pip install -q -e ".[test,bench]"
	bash tools/setup_mlserver.sh
	$(BIN)/python -m pytest -q -p no:cacheprovider bench/test_stage_costs.py --benchmark-enable --benchmark-only \
	  --benchmark-columns=median,iqr,ops --benchmark-sort=name --benchmark-json=bench/results/stages.json
	$(BIN)/python bench/harness.py

clean:
	rm -rf $(VENV) .venv-mlserver var .mypy_cache .ruff_cache .pytest_cache
