"""1. Time to connectable through the full API path, next to the naive baseline.
2. Where the time goes for one MySQL create.

A create is timed from sending the POST to the first successful login with the credentials the
config endpoint returns, polling the instance's status in between, as a user's script would.
"""

from itertools import repeat

from . import baseline, report
from .client import Created, create_and_connect, delete_all, in_parallel

KINDS = ("redis", "mysql")


def run(token: str, *, creates: int, concurrency: int) -> tuple[dict, dict]:
    """Per kind: `creates` sequential and `creates` `concurrency` at a time, for the portal and
    the baseline. Returns (time to connectable, the MySQL breakdown)."""
    results = {}
    mysql_sequential: list[Created] = []
    for kind in KINDS:
        report.progress(f"time to connectable: {kind}, portal")
        sequential = [create_and_connect(token, kind) for _ in range(creates)]
        delete_all(token, sequential)
        concurrent = in_parallel(create_and_connect, repeat(token), [kind] * creates, workers=concurrency)
        delete_all(token, concurrent)
        report.progress(f"time to connectable: {kind}, naive baseline")
        baseline_sequential = baseline.run(kind, creates, workers=1)
        baseline_concurrent = baseline.run(kind, creates, workers=concurrency)
        results[kind] = {
            "sequential": report.summary([c.seconds for c in sequential]),
            "concurrent": report.summary([c.seconds for c in concurrent]),
            "baseline_sequential": report.summary(baseline_sequential),
            "baseline_concurrent": report.summary(baseline_concurrent),
        }
        for mode in ("sequential", "concurrent"):
            results[kind][f"baseline_over_portal_p50_{mode}"] = round(
                results[kind][f"baseline_{mode}"]["p50_ms"] / results[kind][mode]["p50_ms"], 2
            )
        if kind == "mysql":
            mysql_sequential = sequential
    results["concurrency"] = concurrency
    return results, breakdown(mysql_sequential)


def breakdown(creates: list[Created]) -> dict:
    """The steps of the sequential MySQL create with the median total, in milliseconds.

    `api` is the POST's round trip as the client saw it; `queued` to `first_login` are the
    worker's own timings (`queued` runs from the row's creation inside the POST, so it
    overlaps the POST's last few milliseconds); `server_start` includes MariaDB running the
    init file that creates the user and database. The rest is the client noticing `running`
    (status polled every 20 ms), fetching the config and logging in.
    """
    median = sorted(creates, key=lambda c: c.seconds)[len(creates) // 2]
    steps = {"api": median.api} | {
        step: median.timings[step] for step in ("queued", "data_directory", "server_start", "first_login")
    }
    steps["status_poll_config_and_client_login"] = median.seconds - sum(steps.values())
    return {
        "instance_id": median.id,
        "total_ms": round(median.seconds * 1000, 1),
        "steps_ms": {step: round(seconds * 1000, 1) for step, seconds in steps.items()},
    }
