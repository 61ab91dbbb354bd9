# Backtrack developer tasks (GNU make). `make` or `make help` lists them.
# Only Python 3.11+ is needed: dependencies install from requirements.lock into .venv,
# and a throwaway Redis is started when REDIS_URL is not set.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
MANAGE := $(BIN)/python manage.py
DEVSTACK := $(BIN)/python -m config.devstack
PYTEST_ARGS ?=
BENCH_ARGS ?=
CHAOS_ARGS ?= --sagas 100 --workers 2

# The version check, as a shell command: `$(call require_py311,PYTHON)`.
require_py311 = $(1) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	echo "error: Backtrack needs Python 3.11 or newer, but '$(1)' is $$(command -v $(1) >/dev/null && $(1) --version 2>&1 || echo 'not found')." >&2; \
	echo "       Install one and run e.g. 'make PYTHON=python3.12 $(MAKECMDGOALS)' (after 'make clean' if .venv exists)." >&2; \
	exit 1; }

.DEFAULT_GOAL := help
.PHONY: help install run test bench shell chaos lint format migrate clean lock

help: ## List the targets
	@echo "Backtrack: make <target>"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: PYTHON (default python3), PYTEST_ARGS, BENCH_ARGS, CHAOS_ARGS, DATABASE_URL, REDIS_URL, FLOWER_BASIC_AUTH, WEB_PORT, FLOWER_PORT"

$(BIN)/python:
	@$(call require_py311,$(PYTHON))
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.lock | $(BIN)/python
	@$(call require_py311,$(BIN)/python)
	$(BIN)/python -m pip install --disable-pip-version-check --require-hashes -r requirements.lock
	@touch $@

install: $(STAMP) ## Create .venv and install the locked dependencies (again when the lock changes)
	@if [ pyproject.toml -nt requirements.lock ]; then \
		echo "warning: pyproject.toml is newer than requirements.lock; run 'make lock' if dependencies changed" >&2; fi

# config/devstack.py: migrate, seed_demo, config/Procfile under honcho, the banner once
# everything answers; it holds the terminal, so Ctrl-C stops the stack and make exits 0.
run: export PATH := $(CURDIR)/$(BIN):$(PATH)
run: export FLOWER_BASIC_AUTH ?= flower:flower-dev
run: install ## Migrate, seed the demo data and run web, worker, beat and Flower (Ctrl-C stops all)
	@$(DEVSTACK) run


test: lint ## Lint, then pytest against Redis and the database (PYTEST_ARGS="-x -k saga")
	$(DEVSTACK) redis-exec -- $(BIN)/pytest $(PYTEST_ARGS)

bench: export PATH := $(CURDIR)/$(BIN):$(PATH)
bench: install ## Benchmark sagas against a bare Celery chain (BENCH_ARGS="--sagas 200 --json bench.json")
	$(DEVSTACK) redis-exec -- sh -c '$(MANAGE) migrate --no-input && $(MANAGE) bench $(BENCH_ARGS)'

shell: install ## Django shell in .venv, on the same database and Redis as a running `make run`
	$(MANAGE) shell

chaos: export PATH := $(CURDIR)/$(BIN):$(PATH)
chaos: install ## A chaos run with its own workers (CHAOS_ARGS="--sagas 200 --workers 2")
	$(DEVSTACK) redis-exec -- sh -c '$(MANAGE) migrate --no-input && $(MANAGE) chaos $(CHAOS_ARGS)'

lint: install ## ruff check, ruff format --check and the import contracts (lint-imports)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: install ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

migrate: install ## Apply the database migrations
	$(MANAGE) migrate --no-input

clean: ## Remove .venv, .run, the SQLite databases and tool caches
	rm -rf $(VENV) .run db.sqlite3 db.sqlite3-* .test-db*.sqlite3* \
		.pytest_cache .ruff_cache .import_linter_cache staticfiles

lock: install ## Re-resolve pyproject.toml into requirements.lock (uses uv, installed into .venv)
	$(BIN)/python -m pip install --disable-pip-version-check --quiet uv
	$(BIN)/uv pip compile pyproject.toml --extra dev --universal --python-version 3.11 \
		--generate-hashes -o requirements.lock
