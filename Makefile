# Two commands matter: `make run` (service + local Kafka) and `make test` (everything).
# Both build .venv at the repository root first, from pyproject.toml.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
KAFKA := deploy/local/kafka
export KAFKA_PORT ?= 9092
export CALLSTATUS_KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:$(KAFKA_PORT)

.PHONY: venv run kafka-up kafka-down kafka-reset lint test test-unit image-test bench schemas lock clean

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

# The service on http://127.0.0.1:8080 with a local broker and local accounts: a
# one-account accounts file (.callstatus-accounts.yaml, bound to the README example's
# account, reloaded while the service runs as the manifests' Secret is), made once and
# named in .callstatus.env, where `callstatus sign` and `callstatus simulate` find it too.
# The file's account has an API key, and .callstatus.env points reconciliation at the
# FreeClimb API stand-in `callstatus simulate` runs on 127.0.0.1:8082 (after 20 s, a
# sweep every 15 s), so `callstatus simulate --lost 0.1` shows lost callbacks recovered.
# A .callstatus.env from before (the SIGNING_SECRETS shorthand) is kept and still works.
run: venv kafka-up
	$(BIN)/callstatus local-secret
	CALLSTATUS_LOG_FORMAT=$${CALLSTATUS_LOG_FORMAT:-console} \
	CALLSTATUS_SPOOL_DIR=$${CALLSTATUS_SPOOL_DIR:-deploy/local/.data/spool} $(BIN)/callstatus serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Unit tests only: no broker needed.
test-unit: venv
	$(BIN)/pytest -m "not kafka"

# Everything: lint, type checks, unit and integration tests against the real broker.
# Four workers: most tests wait more than they compute, and the load tests run one at a
# time on one of them (tests/conftest.py).
test: lint kafka-up
	$(BIN)/pytest -n 4 --durations=15

# The container image built and run for real (root; installs and starts Docker when
# absent, makes a base image from Debian's packages once): tests/image/check_image.py.
image-test: venv
	$(BIN)/python -m tests.image.check_image

# The benchmark of issues 10 and 21 (about seven minutes; needs wrk, Go and Java): a
# private broker on BENCH_KAFKA_PORT, the service, the Go peer and the baselines under
# load; the table is printed and bench/results/ gets results.json, table.md and
# latency.png. Then `$(BIN)/python -m bench.report --readme` puts the run in the README.
BENCH_KAFKA_PORT ?= 20400
$(BIN)/.bench-installed: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m bench --kafka-port $(BENCH_KAFKA_PORT)

schemas: venv
	$(BIN)/python -m schemas.export
	$(BIN)/python -m service.accountsfile

# The image's pinned runtime set: what `pip install .` resolves to in a clean venv.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet .
	{ echo "# Runtime dependency set of the container image, pinned. Regenerate with \`make lock\`"; \
	  echo "# (a clean venv, pip install ., pip freeze); tests/test_lock.py checks it."; \
	  .lock-venv/bin/pip freeze --exclude callstatus; } > requirements.lock
	rm -rf .lock-venv build callstatus.egg-info

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
