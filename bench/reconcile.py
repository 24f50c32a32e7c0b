"""5. Seconds per reconcile pass over running instances, timed in-process as the beat task runs it.

The instances are real (provisioned through the API), mostly Redis to keep memory modest: each
idle `redis-server` is a few MB, so 1,000 of them fit on the 2-core, 24 GiB test machine. The
bench's stack allows that many (bench.stack: quota, memory budget and port range). Each pass also
says how long each of its phases took (`Pass.seconds`), so a slow pass shows where its time went.
BENCH_RECONCILE_PROFILE=<file> writes a cProfile of the first pass there (for `python -m pstats`).
"""

import cProfile
import os
import time
from itertools import repeat

from provisioning.reconciler import Reconciler

from . import report
from .client import create_and_connect, delete_all, in_parallel

CREATE_POLL = 0.1  # seconds between status polls while provisioning (not timed here)


def _create(token: str, kind: str):
    return create_and_connect(token, kind, poll=CREATE_POLL)


def run(token: str, *, redis_count: int, mysql_count: int, passes: int, concurrency: int) -> dict:
    kinds = ["mysql"] * mysql_count + ["redis"] * redis_count
    report.progress(f"reconcile: provisioning {mysql_count} MySQL + {redis_count} Redis instances")
    created = in_parallel(_create, repeat(token), kinds, workers=concurrency)
    try:
        report.progress(f"reconcile: {passes} passes")
        seconds, phases = [], []
        profile_to = os.environ.get("BENCH_RECONCILE_PROFILE")
        for number in range(passes):
            profiler = cProfile.Profile() if profile_to and number == 0 else None
            start = time.perf_counter()
            if profiler:
                outcome = profiler.runcall(Reconciler().run_once)
                profiler.dump_stats(profile_to)
            else:
                outcome = Reconciler().run_once()
            seconds.append(time.perf_counter() - start)
            phases.append(outcome.seconds)
            if outcome.probed != len(created) or outcome.unhealthy or outcome.stuck or outcome.failed_phases:
                raise RuntimeError(f"the reconcile pass found trouble: {outcome}")
            report.progress(f"reconcile: pass {number + 1} took {seconds[-1]:.3f} s: {outcome.seconds}")
    finally:
        report.progress(f"reconcile: deleting {len(created)} instances")
        delete_all(token, created)
    median = sorted(range(passes), key=seconds.__getitem__)[passes // 2]
    return {
        "instances": len(created),
        "redis": redis_count,
        "mysql": mysql_count,
        "passes": [round(s, 3) for s in seconds],
        "median_seconds": round(seconds[median], 3),
        "max_seconds": round(max(seconds), 3),
        "median_pass_phases": {name: round(s, 3) for name, s in phases[median].items()},
    }
