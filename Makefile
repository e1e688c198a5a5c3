# The commands from the README. Each target sets up .venv first when it is missing or stale.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned because these two lie on the build machines' disk (a newer torch is a multi-GB download).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

# Everything the pipeline writes at run time stays in the project: data, local store, jobs,
# endpoints, and Prefect's database (so `make ui` shows the runs made by `make run`).
export CIFAR10_PIPELINE_HOME ?= $(CURDIR)/.state
export PREFECT_HOME ?= $(CURDIR)/.state/prefect

.PHONY: setup test lint run bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with its dev extra

lint: setup  ## ruff
	$(BIN)/ruff check .

test: setup  ## ruff, then the test suite
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

run: setup  ## run the whole pipeline locally; options via ARGS='--epochs 1 ...'
	@mkdir -p "$(PREFECT_HOME)"  # Prefect creates only the last level of its home
	$(BIN)/cifar10-pipeline run $(ARGS)

bench: setup  ## run the benchmarks in bench/ and print their figures
	$(BIN)/python bench/train_vs_seed.py $(BENCH_ARGS)

clean:  ## remove the virtual environment and all local state
	rm -rf $(VENV) .state .pytest_cache .ruff_cache *.egg-info
