# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Start web (http://127.0.0.1:8000), worker and beat on the embedded defaults.
run: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/ingest db upgrade
	PATH="$(BIN):$$PATH" $(BIN)/honcho start -f Procfile web worker beat

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
