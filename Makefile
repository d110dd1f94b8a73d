# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-matrix lint typecheck check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: the whole local stack (private server, mock Node API, simulator, 2 replicas, live view)
run: $(STAMP)
	$(BIN)/provisioner dev

## test: the whole test suite against private servers
test: $(STAMP)
	$(BIN)/pytest -q

## test-matrix: the state-machine and replica tests against every server engine on this machine
test-matrix: $(STAMP)
	@engines="$$($(BIN)/python -m provisioner.redis_server --list)"; \
	for engine in $$engines; do \
		echo "== $$($$engine --version)"; \
		PROVISIONER_TEST_REDIS_BINARY=$$engine $(BIN)/pytest -q -m "not e2e" || exit 1; \
	done

lint: $(STAMP)
	$(BIN)/ruff check provisioner tests

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
