"""Runs every section against a fresh bench stack, writes bench/results.json, prints the table.

The stack is the portal's own: a Redis broker, a Celery worker (no beat, so the only reconcile
passes are the timed ones) and gunicorn, with DATA_DIR=var/bench, SQLite, and instance ports
18000-19499 (see bench.stack to move them). Everything it starts is stopped by PID; every instance
server it provisioned is deleted through the API, and whatever an error left behind is killed at
the end, and the filesystems the worker kept ready are unmounted. BENCH_SECTIONS (e.g.
"snapshots,density") runs only those sections.
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

from . import api_load, changes, chart, connectable, density, pitr, pool, reconcile, report, snapshots, stack
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
    snapshot_rows: int  # MySQL rows and Redis keys of 1,000 bytes each
    snapshot_repeats: int
    pitr_writes: int  # after each base snapshot, one row or key per statement
    pitr_seconds: float  # over which the writes are paced
    pitr_repeats: int
    change_rows: int  # MySQL rows and Redis keys of 1,000 bytes, checked after every change
    change_repeats: int  # each: a live change up, a restart, a live change down
    pool_creates: int  # per kind: pooled, cold and bare, sequential
    pool_rounds: int  # per kind: rounds of 8 pooled creates at once


FULL = Plan(
    creates=20,
    concurrency=8,
    requests=2000,
    reconcile_redis=990,
    reconcile_mysql=10,
    reconcile_passes=3,
    snapshot_rows=100_000,
    snapshot_repeats=3,
    pitr_writes=10_000,
    pitr_seconds=10,
    pitr_repeats=3,
    change_rows=10_000,
    change_repeats=5,
    pool_creates=20,
    pool_rounds=3,
)
QUICK = Plan(
    creates=5,
    concurrency=8,
    requests=300,
    reconcile_redis=195,
    reconcile_mysql=5,
    reconcile_passes=2,
    snapshot_rows=20_000,
    snapshot_repeats=1,
    pitr_writes=2_000,
    pitr_seconds=4,
    pitr_repeats=1,
    change_rows=1_000,
    change_repeats=2,
    pool_creates=5,
    pool_rounds=1,
)
SECTIONS = ("connectable", "density", "reconcile", "snapshots", "pitr", "changes", "pool", "api_load")


def fresh_state() -> None:
    """Forget earlier bench runs: stop their servers, remove their database, instances and snapshots.

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
    for path in settings.STOCKROOM_SNAPSHOT_DIR.iterdir():  # the folder itself stays, made 0700 by settings
        if path.is_dir():
            shutil.rmtree(path)
        else:
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


def sections() -> tuple[str, ...]:
    wanted = tuple(name.strip() for name in os.environ.get("BENCH_SECTIONS", "").split(",") if name.strip())
    unknown = set(wanted) - set(SECTIONS)
    if unknown:
        raise SystemExit(
            f"BENCH_SECTIONS: unknown {', '.join(sorted(unknown))}; the sections are {', '.join(SECTIONS)}."
        )
    return wanted or SECTIONS


def main() -> None:
    started = time.monotonic()
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    plan = QUICK if quick else FULL
    wanted = sections()
    results = {
        "machine": report.machine(),
        "quick": quick,
        "plan": asdict(plan),
        "sections": list(wanted),
        "limits": stack.limits(),
    }
    report.progress(f"the bench's own limits: {results['limits']}")
    fresh_state()
    call_command("migrate", verbosity=0, interactive=False)
    call_command("collectstatic", verbosity=0, interactive=False)  # as make run does; gunicorn serves it
    token = bench_token()
    env = dict(os.environ)
    services = (stack.broker(), stack.worker(env, concurrency=plan.concurrency), stack.web(env))
    try:
        with stack.running(*services):
            warm_up(token, plan.concurrency)
            if "connectable" in wanted:
                results["connectable"], results["breakdown"] = connectable.run(
                    token, creates=plan.creates, concurrency=plan.concurrency
                )
            if "density" in wanted:
                results["density"] = density.run(token)
            if "reconcile" in wanted:
                results["reconcile"] = reconcile.run(
                    token,
                    redis_count=plan.reconcile_redis,
                    mysql_count=plan.reconcile_mysql,
                    passes=plan.reconcile_passes,
                    concurrency=plan.concurrency,
                )
            if "snapshots" in wanted:
                results["snapshots"] = snapshots.run(token, count=plan.snapshot_rows, repeats=plan.snapshot_repeats)
            if "pitr" in wanted:
                results["pitr"] = pitr.run(
                    token,
                    count=plan.snapshot_rows,
                    writes=plan.pitr_writes,
                    seconds=plan.pitr_seconds,
                    repeats=plan.pitr_repeats,
                )
            if "changes" in wanted:
                results["changes"] = changes.run(token, rows=plan.change_rows, repeats=plan.change_repeats)
    finally:
        connections.close_all()
        kill_processes_under(settings.STOCKROOM_INSTANCES_DIR)  # only if an error left some behind
        get_backend("local").forget_ready()  # the worker's filesystems kept ready: nothing stays mounted
    if "pool" in wanted:  # a stack of its own: the same database, a worker and web with a warm pool
        pooled = env | pool.environment()
        services = (stack.broker(), stack.worker(pooled, concurrency=plan.concurrency), stack.web(pooled))
        try:
            with stack.running(*services):
                results["pool"] = pool.run(token, creates=plan.pool_creates, rounds=plan.pool_rounds)
        finally:
            connections.close_all()
            kill_processes_under(settings.STOCKROOM_INSTANCES_DIR)  # the pool's servers, and what an error left
            get_backend("local").forget_ready()
        report.progress(f"warm pool: drawing {chart.PICTURE.relative_to(stack.BASE_DIR)}")
        chart.draw(results["pool"])
    if "api_load" in wanted:
        results["api_load"] = api_load_everywhere(plan.requests)
    results["seconds"] = round(time.monotonic() - started, 1)
    report.write(results)
    print(report.table(results))
    print(f"\nMachine: {report.describe_machine(results['machine'])}")
    print(f"Limits the bench set for its stack: {results['limits']}")
    print(f"{'Quick run' if quick else 'Full run'} in {results['seconds']:g} s; written to {report.RESULTS}.")
