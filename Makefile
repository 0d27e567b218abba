# deephemnma — two commands: `make run` (the embedded demo) and `make test` (the test suite).
# Both create or reuse the virtual environment in $(VENV) and install the pinned
# dependencies (requirements/lock.txt) first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
STAMP := $(VENV)/.deps-installed
CORES ?= all
CONFIG ?= config/config.yaml
PYTEST_ARGS ?=

.PHONY: install test run bench clean help

help:
	@echo "make run    run the embedded demo workflow (config/config.yaml) into results/"
	@echo "make test   run the test suite"
	@echo "make bench  run the benchmark scripts (bench/), results in bench/results/"

$(BIN)/python:
	$(PYTHON) scripts/make_venv.py $(VENV)

$(STAMP): $(LOCK) pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

run: install
	$(BIN)/snakemake --cores $(CORES) --configfile $(CONFIG) --rerun-incomplete

bench: install
	for s in bench/bench_*.py; do $(BIN)/python $$s || exit 1; done

clean:
	rm -rf results .snakemake
