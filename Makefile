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
ifeq ($(origin PREFECT_HOME),undefined)
# Prefect's profiles stay where the user keeps them: the active one may name their own server
# or Prefect Cloud workspace (`prefect cloud login` writes it there). Not for test, bench and
# soak, which must never reach a user's server.
run ui serve deploy worker: export PREFECT_PROFILES_PATH ?= $(HOME)/.prefect/profiles.toml
endif
export PREFECT_HOME ?= $(CURDIR)/.state/prefect
# Prefect's server reports usage telemetry; offline (as on the build machines) every run would
# log an ERROR for it. Set to true to send it.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

# The Prefect server of `make ui`.
UI_HOST := 127.0.0.1
UI_PORT ?= 4200
API_URL := http://$(UI_HOST):$(UI_PORT)/api
# `make ui`'s server requires this checkout's auth string (created on first use, mode 0600):
# on a shared machine, whoever binds the port first must not receive our runs.
AUTH_FILE = $(CIFAR10_PIPELINE_HOME)/prefect-auth
# The Prefect API that `make serve`, `deploy`, `worker` and `run` talk to: the user's own
# (PREFECT_API_URL from the environment or the active Prefect profile: a self-hosted server or
# Prefect Cloud), else `make ui`'s, and that one only once it has proved to be this checkout's
# (it refuses a request without the auth string and accepts ours; anything else on the port
# is refused in one line). For `run`, `make ui`'s only while something answers there;
# otherwise the run starts a temporary server over the same database.
USE_API = api="$$($(BIN)/python -m flows.prefect_api --fallback $(API_URL) $(1))" || exit 1; \
	url="$$(head -n 1 <<<"$$api")"; \
	if [ -n "$$url" ]; then export PREFECT_API_URL="$$url"; echo "Prefect API: $$url"; fi; \
	if [ "$$(sed -n 2p <<<"$$api")" = fallback ]; then \
		export PREFECT_API_AUTH_STRING="$$(cat "$(AUTH_FILE)")"; fi
# `make serve` / `make deploy` with NOTIFY_BLOCK=<a Prefect notification block's name> also
# install the automation that sends failed, crashed and timed-out runs to it.
NOTIFY_BLOCK ?=
NOTIFY_ARGS = $(if $(NOTIFY_BLOCK),--notify-block '$(NOTIFY_BLOCK)')
# Prefect's database vacuum on `make ui`'s server deletes finished flow runs (with their logs
# and artifacts) this many days after they ended.
RUN_RETENTION_DAYS ?= 90
# The timezone the deployments' cron schedules are read in (an IANA name), for both routes.
export CIFAR10_SCHEDULE_TZ ?= UTC
WORK_POOL := cifar10-local

.PHONY: setup browser test lint run ui serve deploy worker bench soak clean help \
	prefect-home isolated-prefect-home

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11, 4))' 2>/dev/null || { \
		echo "error: the project needs Python >= 3.11.4; $(PYTHON) is $$($(PYTHON) --version \
		2>&1). Run make with PYTHON=python3.11 (or newer)."; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_PINS)
	$(BIN)/python -m pip install --quiet -e '.[dev]' $(TORCH_PINS)
	touch $@

setup: $(VENV)/.installed  ## create .venv and install the project with its dev extra

# Prefect creates its home directory but not the directories above it (a fresh clone has no
# .state/): without this, `make ui` or `make run` there fails with "unable to open database file",
# and every other Prefect import warns that it could not create it. (A recipe, not a file
# target: make splits paths with spaces.)
prefect-home:
	@mkdir -p "$$PREFECT_HOME"

# test, bench and soak never reach a user's Prefect server or Cloud workspace: the project's
# own Prefect home, no API URL, key or profiles from the environment.
ISOLATED_PREFECT := env -u PREFECT_API_URL -u PREFECT_API_KEY -u PREFECT_PROFILES_PATH \
	PREFECT_HOME="$(CURDIR)/.state/prefect"
isolated-prefect-home:
	@mkdir -p "$(CURDIR)/.state/prefect"

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

# The tests run in parallel worker processes (pytest-xdist), each module on one worker (its
# servers and trained models are module-wide); TEST_WORKERS=0 runs them all in one process.
TEST_WORKERS ?= auto
test: setup browser | isolated-prefect-home  ## ruff, then the test suite (in parallel; prints the 15 slowest)
	$(BIN)/ruff check .
	$(ISOLATED_PREFECT) $(BIN)/pytest -n $(TEST_WORKERS) --maxprocesses 4 --dist loadscope \
		--no-loadscope-reorder --durations=15 $(PYTEST_ARGS)

# With `make ui` running, the run reports to it (watch it live); otherwise Prefect starts a
# temporary server on the same database, and `make ui` shows the run afterwards.
run: setup | prefect-home  ## run the whole pipeline locally; options via ARGS='--epochs 1 ...'
	@$(call USE_API,--if-up); $(BIN)/cifar10-pipeline run $(ARGS)

# PREFECT_UI_API_URL is spelt out: the UI would otherwise follow a PREFECT_API_URL from the
# environment (another server, Prefect Cloud) instead of this server; PREFECT_UI_URL gives the
# failure notices their link to the run. The auth string travels
# in the environment, never on a command line (which every user can read).
ui: setup | prefect-home  ## Prefect server + UI on http://127.0.0.1:4200 over .state/prefect (Ctrl-C stops)
	@auth="$$($(BIN)/python -m flows.prefect_api --print-auth-string)" || exit 1; \
	echo "Prefect UI: http://$(UI_HOST):$(UI_PORT) - log in with: $$auth (kept in $(AUTH_FILE))"; \
	echo "Finished runs older than $(RUN_RETENTION_DAYS) days are deleted (RUN_RETENTION_DAYS)"; \
	PREFECT_SERVER_API_AUTH_STRING="$$auth" \
	PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED="$${PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED:-events,flow_runs}" \
	PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD=$$(( $(RUN_RETENTION_DAYS) * 86400 )) \
	PREFECT_SERVER_API_HOST=$(UI_HOST) PREFECT_SERVER_API_PORT=$(UI_PORT) \
	PREFECT_UI_URL=http://$(UI_HOST):$(UI_PORT) \
	PREFECT_UI_API_URL=$(API_URL) exec $(BIN)/prefect server start

serve: setup | prefect-home  ## serve the nightly pipeline, hourly reaper, on-demand sweep and promote (your Prefect API, else `make ui`'s; SERVE_ARGS, NOTIFY_BLOCK)
	@$(call USE_API); $(BIN)/python -m deployments.serve $(NOTIFY_ARGS) $(SERVE_ARGS)

deploy: setup | prefect-home  ## work-pool route: create the process pool, apply deployments/prefect.yaml (NOTIFY_BLOCK)
	@$(call USE_API); set -e; \
	$(BIN)/prefect work-pool inspect $(WORK_POOL) >/dev/null 2>&1 \
		|| $(BIN)/prefect work-pool create $(WORK_POOL) --type process; \
	$(BIN)/prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml; \
	$(BIN)/python -m deployments.automations $(NOTIFY_ARGS)

worker: setup | prefect-home  ## work-pool route: a process worker that runs the *-worker deployments
	@$(call USE_API); $(BIN)/prefect worker start --pool $(WORK_POOL)

bench: setup | isolated-prefect-home  ## run every benchmark in bench/, print one table and write it to bench/RESULTS.md (BENCH_ARGS=--quick)
	$(ISOLATED_PREFECT) $(BIN)/python bench/run_all.py --results bench/RESULTS.md $(BENCH_ARGS)

soak: setup | isolated-prefect-home  ## the long endpoint soak run (make test runs an 8-second one); SOAK_SECONDS=180 by default
	SOAK_SECONDS=$${SOAK_SECONDS:-180} $(ISOLATED_PREFECT) $(BIN)/pytest -m soak -s $(PYTEST_ARGS)

clean:  ## remove the virtual environment and all local state
	rm -rf $(VENV) .state .pytest_cache .ruff_cache *.egg-info
