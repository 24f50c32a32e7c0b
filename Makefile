# `make run` and `make test` are the only two commands a new machine needs.
SHELL := /bin/bash
PORT ?= 8000
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test test-fast system test-system lint bench

run: system $(VENV)/.installed .env
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	PORT=$(PORT) scripts/run-all

# The whole suite twice: on SQLite, then on a throwaway PostgreSQL cluster (127.0.0.1:32702) that
# scripts/with-postgres starts and removes. Docker-backend tests need an engine and a locally built
# image; ensure-docker prepares both and the dockerd it may start is stopped when the tests end.
test: test-system $(VENV)/.installed
	@docker_env=$$(scripts/ensure-docker) || exit 1; set -a; eval "$$docker_env"; set +a; \
	status=0; \
	echo "=== The test suite on SQLite"; $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	echo "=== The test suite on PostgreSQL"; scripts/with-postgres $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	if [ -n "$${STOCKROOM_TEST_DOCKERD_PID:-}" ]; then kill "$$STOCKROOM_TEST_DOCKERD_PID"; fi; \
	exit $$status

# Logic only, over an in-memory fake backend (no servers, no broker): well under 30 s.
test-fast: $(VENV)/.installed
	$(VENV)/bin/pytest provisioning/tests/fast $(PYTEST_ARGS)

# The benchmark against a stack of its own (var/bench, web port 8700); not part of make test.
# BENCH_QUICK=1 does less of each measurement and finishes in under two minutes.
bench: system $(VENV)/.installed
	BENCH_QUICK=$(BENCH_QUICK) $(PY) -m bench

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

system:
	@scripts/ensure-system

test-system:  # browser tests need Debian's chromium; Docker tests docker.io and debootstrap
	@scripts/ensure-system chromium docker.io debootstrap postgresql

$(VENV)/.installed: requirements.txt
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && "$$(scripts/find-python)" -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

# Random keys for this checkout, written once; keep .env out of version control.
.env:
	@umask 077; { \
	  echo "DEBUG=False"; \
	  echo "SECRET_KEY=$$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')"; \
	  echo "STOCKROOM_ENCRYPTION_KEYS=$$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')"; \
	} > $@
	@echo "Wrote .env with new random keys."
