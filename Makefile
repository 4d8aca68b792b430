# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install lock run demo test lint format bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[run,dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

## Re-pin constraints.txt on purpose: the newest versions pyproject.toml allows, resolved in
## a fresh virtualenv (a temporary directory, removed after); the file's header is kept.
lock:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install --quiet --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install --quiet -e '.[run,dev]'; \
	awk '!/^#/ {exit} {print}' constraints.txt > "$$tmp/constraints.txt"; \
	"$$tmp/venv/bin/python" -m pip freeze --exclude-editable >> "$$tmp/constraints.txt"; \
	mv "$$tmp/constraints.txt" constraints.txt

# `make run` talks to a local provider sandbox (started beside the service) unless these are
# set in the environment: export the real providers' URLs to receive real media.
SANDBOX_PORT ?= 8090
run demo: export SANDBOX_PORT := $(SANDBOX_PORT)
run demo: export INGEST_GRAPH_URL ?= http://127.0.0.1:$(SANDBOX_PORT)/v21.0
run demo: export INGEST_D360_URL ?= http://127.0.0.1:$(SANDBOX_PORT)/d360
run demo: export INGEST_MEDIA_HOSTS ?= 127.0.0.1:$(SANDBOX_PORT)

## Start web (http://127.0.0.1:8000), worker, beat and the provider sandbox.
## Another port: `WEB_PORT=8001 make run` (the sandbox's: SANDBOX_PORT).
WEB_PORT ?= 8000
run: export WEB_PORT := $(WEB_PORT)
run: $(STAMP)
	@$(BIN)/ingest ports-free --then "make run" WEB_PORT=$(WEB_PORT) SANDBOX_PORT=$(SANDBOX_PORT)
	PATH="$(BIN):$$PATH" $(BIN)/ingest db upgrade
	PATH="$(BIN):$$PATH" $(BIN)/honcho start -f Procfile.dev

## Watch real media go through `make run`'s service (run it in a second terminal).
demo: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/ingest demo --events $(or $(EVENTS),200)

## The whole suite. Real PostgreSQL/Redis when INGEST_TEST_*_URL are set (see .ci/run).
## With a coverage report of the code the suite runs in its own process (pyproject.toml's
## [tool.coverage]); below COVERAGE_FLOOR percent it fails. A subset: run pytest directly.
## Everything but the fault suite runs on TEST_WORKERS processes (pytest-xdist; each has its
## own PostgreSQL database and Redis key prefix); the fault suite runs after, alone, since
## its bounds are timings of whole stacks that must not share the cores with other tests.
COVERAGE_FLOOR ?= 94
TEST_WORKERS ?= auto
test: $(STAMP)
	PATH="$(BIN):$$PATH" $(BIN)/pytest -n $(TEST_WORKERS) -m "not faults" --cov --cov-report= $(PYTEST_ARGS)
	PATH="$(BIN):$$PATH" $(BIN)/pytest -m faults --cov --cov-append --cov-report=term \
		--cov-fail-under=$(COVERAGE_FLOOR) $(PYTEST_ARGS)

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
