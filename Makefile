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
# Prefect's server reports usage telemetry; offline (as on the build machines) every run would
# log an ERROR for it. Set to true to send it.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

# The Prefect server of `make ui`; `make serve`, `make deploy` and `make worker` talk to it.
UI_HOST := 127.0.0.1
UI_PORT ?= 4200
API_URL := http://$(UI_HOST):$(UI_PORT)/api
serve deploy worker: export PREFECT_API_URL := $(API_URL)
# The timezone the deployments' cron schedules are read in (an IANA name), for both routes.
export CIFAR10_SCHEDULE_TZ ?= UTC
WORK_POOL := cifar10-local

.PHONY: setup browser test lint run ui serve deploy worker bench soak clean help

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

# Prefect creates its home directory but not the directories above it (a fresh clone has no
# .state/): without this, `make ui` or `make run` there fails with "unable to open database file",
# and every other Prefect import warns that it could not create it.
$(PREFECT_HOME):
	mkdir -p $@

lint: setup  ## ruff
	$(BIN)/ruff check .

# The UI test drives headless Chromium. Installed when missing and possible (root and apt-get,
# as in CI); otherwise that one test is skipped and says why.
browser:  ## headless Chromium for the UI test (apt-get, when root)
	@if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the UI test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| echo "warning: could not install chromium: the UI test will be skipped"; \
	else echo "note: no chromium and no root apt-get to install it: the UI test will be skipped"; \
	fi

test: setup browser | $(PREFECT_HOME)  ## ruff, then the test suite
	$(BIN)/ruff check .
	$(BIN)/pytest $(PYTEST_ARGS)

# With `make ui` running, the run reports to it (watch it live); otherwise Prefect starts a
# temporary server on the same database, and `make ui` shows the run afterwards.
run: setup | $(PREFECT_HOME)  ## run the whole pipeline locally; options via ARGS='--epochs 1 ...'
	@if $(BIN)/python -c "import urllib.request as u; u.urlopen('$(API_URL)/health', timeout=2)" \
		2>/dev/null; then export PREFECT_API_URL=$(API_URL); fi; \
	$(BIN)/cifar10-pipeline run $(ARGS)

# PREFECT_UI_API_URL is spelt out: the UI would otherwise follow a PREFECT_API_URL from the
# environment (another server, Prefect Cloud) instead of this server.
ui: setup | $(PREFECT_HOME)  ## Prefect server + UI on http://127.0.0.1:4200 over .state/prefect (Ctrl-C stops)
	PREFECT_SERVER_API_HOST=$(UI_HOST) PREFECT_SERVER_API_PORT=$(UI_PORT) \
	PREFECT_UI_API_URL=$(API_URL) $(BIN)/prefect server start

serve: setup | $(PREFECT_HOME)  ## serve the nightly pipeline + hourly reaper to `make ui` (options: SERVE_ARGS)
	$(BIN)/python -m deployments.serve $(SERVE_ARGS)

deploy: setup | $(PREFECT_HOME)  ## work-pool route: create the process pool, apply deployments/prefect.yaml
	$(BIN)/prefect work-pool inspect $(WORK_POOL) >/dev/null 2>&1 \
		|| $(BIN)/prefect work-pool create $(WORK_POOL) --type process
	$(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
	$(BIN)/python -m deployments.automations

worker: setup | $(PREFECT_HOME)  ## work-pool route: a process worker that runs the *-worker deployments
	$(BIN)/prefect worker start --pool $(WORK_POOL)

bench: setup | $(PREFECT_HOME)  ## run every benchmark in bench/ and print one table (~15 min; BENCH_ARGS=--quick)
	$(BIN)/python bench/run_all.py $(BENCH_ARGS)

soak: setup | $(PREFECT_HOME)  ## the long endpoint soak run (CI runs a 20-second one); SOAK_SECONDS=180 by default
	SOAK_SECONDS=$${SOAK_SECONDS:-180} $(BIN)/pytest -m soak -s $(PYTEST_ARGS)

clean:  ## remove the virtual environment and all local state
	rm -rf $(VENV) .state .pytest_cache .ruff_cache *.egg-info
