"""5. Seconds per reconcile pass over running instances, timed in-process as the beat task runs it.

The instances are real (provisioned through the API), mostly Redis to keep memory modest.
"""

import time
from itertools import repeat

from provisioning.reconciler import Reconciler

from . import report
from .client import create_and_connect, delete_all, in_parallel


def run(token: str, *, redis_count: int, mysql_count: int, passes: int, concurrency: int) -> dict:
    kinds = ["mysql"] * mysql_count + ["redis"] * redis_count
    report.progress(f"reconcile: provisioning {mysql_count} MySQL + {redis_count} Redis instances")
    created = in_parallel(create_and_connect, repeat(token), kinds, workers=concurrency)
    report.progress(f"reconcile: {passes} passes")
    seconds = []
    for _ in range(passes):
        start = time.perf_counter()
        outcome = Reconciler().run_once()
        seconds.append(time.perf_counter() - start)
        if outcome.probed != len(created) or outcome.unhealthy or outcome.stuck:
            raise RuntimeError(f"the reconcile pass found trouble: {outcome}")
    delete_all(token, created)
    return {
        "instances": len(created),
        "redis": redis_count,
        "mysql": mysql_count,
        "passes": [round(s, 3) for s in seconds],
        "median_seconds": round(sorted(seconds)[len(seconds) // 2], 3),
        "max_seconds": round(max(seconds), 3),
    }
