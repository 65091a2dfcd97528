# Two commands matter: `make run` (service + local Kafka) and `make test` (everything).
# Both build .venv at the repository root first, from pyproject.toml.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/local/kafka
export KAFKA_PORT ?= 9092
export CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:$(KAFKA_PORT)

.PHONY: venv run kafka-up kafka-down kafka-reset lint test test-unit bench schemas clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/.installed

kafka-up:
	$(KAFKA) up

kafka-down:
	$(KAFKA) down

kafka-reset:
	$(KAFKA) reset

# The service on http://127.0.0.1:8080 with a local broker and a local signing secret.
run: venv kafka-up
	$(BIN)/callstatus local-secret
	CALLSTATUS_LOG_FORMAT=$${CALLSTATUS_LOG_FORMAT:-console} $(BIN)/callstatus serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Unit tests only: no broker needed.
test-unit: venv
	$(BIN)/pytest -m "not kafka"

# Everything: lint, type checks, unit and integration tests against the real broker.
test: lint kafka-up
	$(BIN)/pytest

# Per-request cost of the ingest handler next to a bare Starlette endpoint.
bench: venv
	$(BIN)/python -m bench.ingest_overhead

schemas: venv
	$(BIN)/python -m schemas.export

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
