"""Runs every section against a fresh bench stack, writes bench/results.json, prints the table.

The stack is the portal's own: a Redis broker, a Celery worker (no beat, so the only reconcile
passes are the timed ones) and gunicorn, with DATA_DIR=var/bench, SQLite, and instance ports
30000-30899. Everything it starts is stopped by PID; every instance server it provisioned is
deleted through the API, and whatever an error left behind is killed at the end.
"""

import os
import shutil
import time
from dataclasses import asdict, dataclass
from itertools import repeat

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connections

from provisioning.backends.base import get_backend
from provisioning.backends.local import kill_processes_under
from provisioning.services.tokens import create_token

from . import api_load, connectable, density, reconcile, report, stack
from .client import create_and_connect, delete_all, in_parallel


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to do; every loop in the bench is bounded by these."""

    creates: int  # per kind, per mode (sequential, concurrent), for the portal and the baseline
    concurrency: int
    requests: int  # per endpoint, per database
    reconcile_redis: int
    reconcile_mysql: int
    reconcile_passes: int


FULL = Plan(creates=20, concurrency=8, requests=2000, reconcile_redis=190, reconcile_mysql=10, reconcile_passes=3)
QUICK = Plan(creates=5, concurrency=8, requests=300, reconcile_redis=45, reconcile_mysql=5, reconcile_passes=2)


def fresh_state() -> None:
    """Forget earlier bench runs: stop their servers, remove their database and instances.

    MariaDB's data-directory template is kept; the warm-up builds it if it is missing.
    """
    backend = get_backend("local")  # every instance is an orphan: their database goes
    for key in backend.orphans(set()):
        backend.remove_orphan(key)  # processes, mounted disk, cgroup and uid included
    backend.forget_ready()
    kill_processes_under(settings.STOCKROOM_INSTANCES_DIR)
    for kind in ("mysql", "redis"):
        shutil.rmtree(settings.STOCKROOM_INSTANCES_DIR / kind, ignore_errors=True)
    for path in stack.DATA_DIR.glob("*.sqlite3*"):
        path.unlink()
    shutil.rmtree(stack.LOG_DIR, ignore_errors=True)


def bench_token() -> str:
    user = get_user_model().objects.create_user("bench")
    return create_token(owner=user, name="bench")[1]


def warm_up(token: str, concurrency: int) -> None:
    """One create per worker process, untimed: builds the MariaDB template if needed and lets
    every worker open its database connection, as in a portal that has been up a while."""
    report.progress("warming up")
    kinds = ["mysql"] + ["redis"] * (concurrency - 1)
    delete_all(token, in_parallel(create_and_connect, repeat(token), kinds, workers=concurrency))


def api_load_everywhere(requests: int) -> dict:
    results = {}
    report.progress("API under load: SQLite")
    results["SQLite"] = api_load.run(f"sqlite:///{stack.DATA_DIR / 'api-load.sqlite3'}", requests=requests)
    with stack.postgres_cluster() as database_url:
        if database_url is None:
            results["PostgreSQL"] = {"skipped": "PostgreSQL is not installed on this machine; skipped."}
        else:
            report.progress("API under load: PostgreSQL")
            results["PostgreSQL"] = api_load.run(database_url, requests=requests)
    return results


def main() -> None:
    started = time.monotonic()
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    plan = QUICK if quick else FULL
    results = {"machine": report.machine(), "quick": quick, "plan": asdict(plan)}
    fresh_state()
    call_command("migrate", verbosity=0, interactive=False)
    call_command("collectstatic", verbosity=0, interactive=False)  # as make run does; gunicorn serves it
    token = bench_token()
    env = dict(os.environ)
    services = (stack.broker(), stack.worker(env, concurrency=plan.concurrency), stack.web(env))
    try:
        with stack.running(*services):
            warm_up(token, plan.concurrency)
            results["connectable"], results["breakdown"] = connectable.run(
                token, creates=plan.creates, concurrency=plan.concurrency
            )
            results["density"] = density.run(token)
            results["reconcile"] = reconcile.run(
                token,
                redis_count=plan.reconcile_redis,
                mysql_count=plan.reconcile_mysql,
                passes=plan.reconcile_passes,
                concurrency=plan.concurrency,
            )
    finally:
        connections.close_all()
        kill_processes_under(settings.STOCKROOM_INSTANCES_DIR)  # only if an error left some behind
    results["api_load"] = api_load_everywhere(plan.requests)
    results["seconds"] = round(time.monotonic() - started, 1)
    report.write(results)
    print(report.table(results))
    print(f"\nMachine: {report.describe_machine(results['machine'])}")
    print(f"{'Quick run' if quick else 'Full run'} in {results['seconds']:g} s; written to {report.RESULTS}.")
