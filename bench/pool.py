"""8. The warm pool: creates that take a server started ahead of time, next to the cold path and a
bare server start measured in the same run.

The portal's worker and web run here with a pool of POOL servers of each kind (the other sections
run without one, so section 1 is the cold path). A create is timed from sending
`POST …/instances?wait=30` to the first login with the credentials its 201 answer carries: one
round trip, then a login. Before each timed create (or round of concurrent creates) the pool is
full again, untimed, as on a portal between bursts. The bare start is the naive baseline of
section 1 (a plain `redis-server`; `mariadb-install-db`, then `mariadbd`), its login tried every
2 ms here so that polling adds little to it. The cold path is the same POST for an option the pool
cannot serve (it needs a restart), so a worker makes the server from nothing.

The burst sends 100 Redis creates from 10 clients as fast as they are answered (no wait), then
waits until every one is running and logged in: the pool serves the first, workers the rest.
"""

import time
from itertools import repeat

from provisioning.models import Instance
from provisioning.services import jobs

from . import baseline, report
from .client import Api, Created, create_and_connect, delete_all, in_parallel, log_in

POOL = 8
KINDS = ("redis", "mysql")
COLD_OPTIONS = {"redis": {"databases": 17}, "mysql": {"lower_case_table_names": 1}}  # not live: the cold path
BARE_POLL = 0.002
BURST = 100
BURST_CLIENTS = 10
FILL_TIMEOUT = 120.0


def environment() -> dict[str, str]:
    """The settings of this section's stack, over the bench's own: a pool."""
    return {"STOCKROOM_POOL_MYSQL": str(POOL), "STOCKROOM_POOL_REDIS": str(POOL)}


def ready(kind: str) -> int:
    return Instance.objects.filter(pool=True, kind=kind, status="running").count()


def until_full(kind: str) -> None:
    """Ask the worker to fill the pool, then wait until POOL servers of `kind` are ready."""
    jobs.send("fill_pool")
    deadline = time.monotonic() + FILL_TIMEOUT
    while ready(kind) < POOL:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the {kind} pool has {ready(kind)} of {POOL} servers after {FILL_TIMEOUT:g} s")
        time.sleep(0.05)


def warm_up(token: str) -> None:
    """Untimed pooled creates, as the bench's warm-up does for the other sections: each web process
    has then served one (its first request loads what it keeps for the next ones)."""
    report.progress("warm pool: warming up")
    for kind in KINDS:
        until_full(kind)
        delete_all(token, in_parallel(pooled, repeat(token), [kind] * 4, workers=4))


def pooled(token: str, kind: str) -> Created:
    created = create_and_connect(token, kind, wait=30)
    if "pool" not in created.timings:
        raise RuntimeError(f"{kind} {created.id} did not come from the warm pool: {created.timings}")
    return created


def run(token: str, *, creates: int, rounds: int) -> dict:
    results: dict = {"pool": POOL, "samples_ms": {}}
    warm_up(token)
    for kind in KINDS:
        report.progress(f"warm pool: {kind}, {creates} sequential")
        sequential = []
        for _ in range(creates):
            until_full(kind)
            sequential.append(pooled(token, kind))
        delete_all(token, sequential)
        report.progress(f"warm pool: {kind}, {rounds} rounds of {POOL} at once")
        concurrent: list[Created] = []
        for _ in range(rounds):
            until_full(kind)
            concurrent += in_parallel(pooled, repeat(token), [kind] * POOL, workers=POOL)
        delete_all(token, concurrent)
        report.progress(f"warm pool: {kind}, cold path and bare start")
        cold = [create_and_connect(token, kind, COLD_OPTIONS[kind], wait=30) for _ in range(creates)]
        delete_all(token, cold)
        bare = baseline.run(kind, creates, workers=1, poll=BARE_POLL)
        results[kind] = {
            "pooled_sequential": report.summary([c.seconds for c in sequential]),
            "pooled_concurrent": report.summary([c.seconds for c in concurrent]),
            "cold_sequential": report.summary([c.seconds for c in cold]),
            "bare_sequential": report.summary(bare),
        }
        results[kind]["bare_over_pooled_p50"] = round(
            results[kind]["bare_sequential"]["p50_ms"] / results[kind]["pooled_sequential"]["p50_ms"], 2
        )
        results["samples_ms"][kind] = {
            "pooled": [round(c.seconds * 1000, 2) for c in sequential],
            "pooled, 8 at once": [round(c.seconds * 1000, 2) for c in concurrent],
            "cold": [round(c.seconds * 1000, 2) for c in cold],
            "bare start": [round(s * 1000, 2) for s in bare],
        }
    until_full("redis")
    results["burst"] = burst(token)
    drain()
    return results


def drain() -> None:
    """Delete the pool's servers through the service, as the reconciler would once the pool is off,
    and wait until the worker has removed them."""
    from provisioning.services import delete_instance

    for server in Instance.objects.filter(pool=True, status="running"):
        delete_instance(instance=server, by="the bench", reason="The bench is done with the warm pool.")
    deadline = time.monotonic() + FILL_TIMEOUT
    while Instance.objects.filter(pool=True).live().exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the warm pool's servers were not removed")
        time.sleep(0.1)


def burst(token: str) -> dict:
    """BURST Redis creates at once: seconds from the first POST until every one was logged in to."""
    report.progress(f"warm pool: a burst of {BURST} Redis creates")
    start = time.perf_counter()
    ids = in_parallel(_post, repeat(token), range(BURST), workers=BURST_CLIENTS)
    api = Api(token)
    waiting, created = set(ids), []
    try:
        while waiting:
            if time.perf_counter() - start > 120:
                raise TimeoutError(f"{len(waiting)} of the burst's creates are not running after 120 s")
            for pk in sorted(waiting):
                detail = api.request("GET", f"/api/storage/redis/instances/{pk}")[1]
                if detail["status"] == "running":
                    log_in("redis", api.request("GET", f"/api/storage/redis/instances/{pk}/config")[1])
                    waiting.discard(pk)
                    created.append(Created("redis", pk, 0.0, 0.0, detail["timings"]))
                elif detail["status"] != "provisioning":
                    raise RuntimeError(f"redis {pk} is {detail['status']}: {detail['status_message']}")
            time.sleep(0.02)
    finally:
        api.close()
    seconds = time.perf_counter() - start
    delete_all(token, created)
    return {
        "creates": BURST,
        "clients": BURST_CLIENTS,
        "from_pool": sum("pool" in c.timings for c in created),
        "all_running_seconds": round(seconds, 2),
    }


def _post(token: str, _index: int) -> int:
    api = Api(token)
    try:
        status, body = api.request("POST", "/api/storage/redis/instances", {})
        if status != 202:
            raise RuntimeError(f"POST redis answered {status}: {body}")
        return int(body["id"])
    finally:
        api.close()
