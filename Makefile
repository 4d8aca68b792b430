# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run demo test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# `make run` talks to a local provider sandbox (started beside the service) unless these are
# set in the environment: export the real providers' URLs to receive real media.
SANDBOX_PORT ?= 8090
run demo: export SANDBOX_PORT := $(SANDBOX_PORT)
run demo: export INGEST_GRAPH_URL ?= http://127.0.0.1:$(SANDBOX_PORT)/v21.0
run demo: export INGEST_D360_URL ?= http://127.0.0.1:$(SANDBOX_PORT)/d360
run demo: export INGEST_MEDIA_HOSTS ?= 127.0.0.1,localhost

## Start web (http://127.0.0.1:8000), worker, beat and the provider sandbox.
run: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/ingest db upgrade
	PATH="$(BIN):$$PATH" $(BIN)/honcho start -f Procfile.dev

## Watch real media go through `make run`'s service (run it in a second terminal).
demo: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/ingest demo --events $(or $(EVENTS),200)

## The whole suite. Real PostgreSQL/Redis when INGEST_TEST_*_URL are set (see .ci/run).
test: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
