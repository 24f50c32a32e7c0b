# `make run` and `make test` are the only two commands a new machine needs.
SHELL := /bin/bash
PORT ?= 8000
VENV := .venv
PY := $(VENV)/bin/python
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check --require-hashes
# Throwaway keys, enough for portal.settings to import in checks that serve no request and
# keep no data; an in-memory database, so a check never touches the portal's own.
CHECK_ENV := STOCKROOM_ENCRYPTION_KEYS=check-only DATABASE_URL=sqlite://:memory:
# A production portal behind a TLS proxy, with a secret key made up on the spot.
DEPLOY_ENV := $(CHECK_ENV) DEBUG=False STOCKROOM_HTTPS=True \
	SECRET_KEY=$$($(PY) -c 'import secrets; print(secrets.token_urlsafe(50))')

.PHONY: run test test-fast check lint system test-system bench soak env-upgrade

run: system $(VENV)/.installed .env env-upgrade
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v0
	PORT=$(PORT) scripts/run-all

# `make check` first; then the whole suite twice: on SQLite, then on a throwaway PostgreSQL cluster
# (127.0.0.1:32702) that scripts/with-postgres starts and removes. Docker-backend tests need an engine
# and a locally built image; ensure-docker prepares both and the dockerd it may start is stopped
# when the tests end. The swarm tests (test_swarm_cluster.py) copy that image onto a three-node swarm
# that devtools/swarm.py builds and takes down in each run.
test: check test-system $(VENV)/.installed-dev
	@docker_env=$$(scripts/ensure-docker) || exit 1; set -a; eval "$$docker_env"; set +a; \
	status=0; \
	echo "=== The test suite on SQLite"; $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	echo "=== The test suite on PostgreSQL"; scripts/with-postgres $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	if [ -n "$${STOCKROOM_TEST_DOCKERD_PID:-}" ]; then kill "$$STOCKROOM_TEST_DOCKERD_PID"; fi; \
	exit $$status

# Logic only, over an in-memory fake backend (no servers, no broker): well under 30 s.
test-fast: $(VENV)/.installed-dev
	$(VENV)/bin/pytest provisioning/tests/fast $(PYTEST_ARGS)

# The benchmark against a stack of its own (var/bench, web port 8700); not part of make test.
# BENCH_QUICK=1 does less of each measurement and finishes in 2 to 6 minutes;
# BENCH_SECTIONS=snapshots (say) runs only those sections. Ports: see the README's "Benchmark".
bench: system $(VENV)/.installed-bench
	BENCH_QUICK=$(BENCH_QUICK) $(PY) -m bench

# The soak against a stack of its own (a temporary DATA_DIR, web port 8720); not part of make test.
# SOAK_ARGS, e.g. "--clients 6 --minutes 4 --kills" (kill -9 servers, the broker and the worker).
soak: system $(VENV)/.installed-dev
	$(PY) -m bench.soak $(SOAK_ARGS)

# Everything CI checks before the tests; stops at the first failure. `make test` runs it first.
check: lint
	$(CHECK_ENV) SECRET_KEY=check-only $(PY) manage.py makemigrations --check --dry-run
	$(DEPLOY_ENV) $(PY) manage.py check --deploy --fail-level WARNING
	$(VENV)/bin/lint-imports
	$(CHECK_ENV) SECRET_KEY=check-only $(VENV)/bin/mypy

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

system:
	@scripts/ensure-system

test-system:  # browser tests need Debian's chromium; Docker tests docker.io and debootstrap
	@scripts/ensure-system chromium docker.io debootstrap postgresql

# What `make run` needs (requirements.txt); tests and checks add requirements-dev.txt.
# Both are compiled with hashes (see the .in files), so pip installs exactly what was reviewed.
$(VENV)/.installed: requirements.txt
	$(PY) -m pip --version >/dev/null 2>&1 || { rm -rf $(VENV) && "$$(scripts/find-python)" -m venv $(VENV); }
	$(PIP_INSTALL) -r requirements.txt
	touch $@

# The bench adds requirements-bench.txt (the picture of its latencies).
$(VENV)/.installed-bench: $(VENV)/.installed requirements-bench.txt
	$(PIP_INSTALL) -r requirements.txt -r requirements-bench.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PIP_INSTALL) -r requirements.txt -r requirements-dev.txt
	touch $@

# Random keys for this checkout, written once; keep .env out of version control. Only the
# portal's user may read it (0600).
.env:
	@umask 077; { \
	  echo "DEBUG=False"; \
	  echo "SECRET_KEY=$$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')"; \
	  echo "STOCKROOM_ENCRYPTION_KEYS=$$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')"; \
	  echo "STOCKROOM_BROKER_PASSWORD=$$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')"; \
	} > $@
	@echo "Wrote .env with new random keys."

# An .env from before the broker had a password gets one (and 0600, whatever it had).
env-upgrade: .env
	@chmod 600 .env
	@grep -q '^STOCKROOM_BROKER_PASSWORD=' .env || { \
	  echo "STOCKROOM_BROKER_PASSWORD=$$(head -c 32 /dev/urandom | base64 | tr -d '/+=\n')" >> .env; \
	  echo "Added a random STOCKROOM_BROKER_PASSWORD to .env."; }
