"""7. Changing an instance after create (issue 16): a live change, next to applying a setting by a
restart, measured in the same run.

Per kind, one instance is created through the API and `rows` rows or keys of 1,000 bytes are
written into it with the user's own client (bench.datasets). Then, `repeats` times over:
- **live, up**: `PATCH /api/storage/{kind}/instances/{id}` with a larger memory size (Redis
  `maxmemory` 64mb → 96mb: the server's setting and its kernel memory limit, a resize; MySQL
  `innodb_buffer_pool_size` 16mb → 32mb and `max_connections` 100 → 150). Timed from sending the
  PATCH to its `202` answer, and on to the new values read back through a new login with the user's
  credentials (`CONFIG GET`, `SELECT @@…`). The answer must have nothing pending. The server must be
  the same process: Redis's `process_id` and `run_id` from `INFO server`, as the user reads them;
  for MySQL the server's PID on the host, and its `Uptime` status, which must not go back;
- **the baseline, applying by restart**: Redis `PATCH …?apply=now` of `databases` (16 ↔ 32, an
  option that waits for a restart), MySQL `POST …/restart` (no MySQL option waits for a restart
  yet: this is what applying one by restart costs). Timed from the request to `running`, and to the
  first login with the user's credentials. Then the server must be a new process, the new
  `databases` in effect, nothing pending, and the live change before it still in effect (the
  restarted server renders the options the live change saved);
- **live, down**: back to the smaller size, timed and checked like the way up.
After every change and restart the data must be exactly what was written (row count and CHECKSUM
TABLE, or key count and a SHA-256 over every value): a change loses nothing. A check that fails
stops the bench with an error instead of a number.

The ratio is restart ÷ live, each to the first read with the user's credentials: how many times
faster a live change is than the same change by restart.
"""

import statistics
import time
from typing import Any

from . import datasets, report
from .client import POLL_INTERVAL, Api, create_and_connect, delete_all, wait_for_login
from .density import server_pid
from .snapshots import check

# Per kind: the options at create, and the two sides of the live change (up, then down).
LIVE = {
    "redis": ({"maxmemory": "96mb"}, {"maxmemory": "64mb"}),
    "mysql": (
        {"innodb_buffer_pool_size": "32mb", "max_connections": 150},
        {"innodb_buffer_pool_size": "16mb", "max_connections": 100},
    ),
}
CREATE = {"redis": {"maxmemory": "64mb"}, "mysql": {"innodb_buffer_pool_size": "16mb", "max_connections": 100}}
MB = 1024**2
TIMEOUT = 120.0  # seconds a restart may take before the bench gives up


def run(token: str, *, rows: int, repeats: int) -> dict:
    results: dict[str, Any] = {"rows_or_keys": rows, "row_bytes": datasets.ROW_BYTES, "repeats": repeats}
    for kind in ("redis", "mysql"):
        results[kind] = measure(token, kind, rows=rows, repeats=repeats)
    return results


def measure(token: str, kind: str, *, rows: int, repeats: int) -> dict:
    instance = create_and_connect(token, kind, CREATE[kind])
    api = Api(token)
    path = f"/api/storage/{kind}/instances/{instance.id}"
    try:
        config = api.request("GET", f"{path}/config")[1]
        report.progress(f"changes: writing {rows:,} × {datasets.ROW_BYTES:,} bytes into {kind}")
        LOADERS[kind](config, rows)
        expected = fingerprint(kind, config, rows)
        numbers: dict[str, list[float]] = {name: [] for name in ("live_answer", "live", "restart_running", "restart")}
        directions: dict[str, list[float]] = {"up": [], "down": []}
        databases = 16
        for repeat in range(repeats):
            report.progress(f"changes: {kind} live up, restart, live down ({repeat + 1}/{repeats})")
            up, down = LIVE[kind]
            for direction, change in (("up", up), ("down", down)):
                answered, read_back = live_change(api, kind, path, config, change)
                numbers["live_answer"].append(answered)
                numbers["live"].append(read_back)
                directions[direction].append(read_back)
                check(fingerprint(kind, config, rows), expected, f"{kind} {instance.id} after a live change")
                if direction == "up":
                    databases = 48 - databases  # 16 → 32 → 16 …
                    running, login = restart(api, kind, path, config, databases=databases, live=up)
                    numbers["restart_running"].append(running)
                    numbers["restart"].append(login)
                    check(fingerprint(kind, config, rows), expected, f"{kind} {instance.id} after a restart")
    finally:
        api.close()
        delete_all(token, [instance])
    medians = {name: statistics.median(values) for name, values in numbers.items()}
    return {
        "live_change": LIVE[kind][0],
        "baseline": "PATCH ?apply=now of databases" if kind == "redis" else "POST …/restart",
        **{name: report.summary(values) for name, values in numbers.items()},
        "live_up_p50_ms": round(statistics.median(directions["up"]) * 1000, 1),
        "live_down_p50_ms": round(statistics.median(directions["down"]) * 1000, 1),
        "restart_over_live_p50": round(medians["restart"] / medians["live"], 1),
        "same_process_live_changes": len(numbers["live"]),
        "data_checks": len(numbers["live"]) + len(numbers["restart"]),
    }


# One live change ----------------------------------------------------------------------


def live_change(api: Api, kind: str, path: str, config: dict[str, Any], change: dict[str, Any]) -> tuple[float, float]:
    """Seconds from sending the PATCH to its 202 answer, and to the new values read back with the
    user's credentials; the server must be the process it was before."""
    before = server_identity(kind, path, config)
    started = time.perf_counter()
    status, body = api.request("PATCH", path, change)
    answered = time.perf_counter() - started
    if status != 202:
        raise RuntimeError(f"PATCH {path} {change} answered {status}: {body}")
    found = read_settings(kind, config)
    read_back = time.perf_counter() - started
    if body["pending_options"] or body["status"] != "running":
        raise RuntimeError(f"a live change of {kind} left {body['status']}, pending {body['pending_options']}")
    check(found, expected_settings(kind, change), f"{kind} after PATCH {change}")
    after = server_identity(kind, path, config)
    if not same_process(before, after):
        raise RuntimeError(f"{kind} {path}: a live change restarted the server ({before} then {after})")
    return answered, read_back


def read_settings(kind: str, config: dict[str, Any]) -> dict[str, int]:
    """The settings a live change sets, as a new login with the user's credentials reads them."""
    if kind == "redis":
        client = datasets.redis_client(config)
        try:
            return {"maxmemory": int(client.config_get("maxmemory")["maxmemory"])}
        finally:
            client.close()
    with datasets.mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT @@GLOBAL.innodb_buffer_pool_size, @@GLOBAL.max_connections")
        pool, connections = cursor.fetchone()
    return {"innodb_buffer_pool_size": int(pool), "max_connections": int(connections)}


def expected_settings(kind: str, change: dict[str, Any]) -> dict[str, int]:
    def size(value: str) -> int:
        return int(value.removesuffix("mb")) * MB

    if kind == "redis":
        return {"maxmemory": size(change["maxmemory"])}
    return {
        "innodb_buffer_pool_size": size(change["innodb_buffer_pool_size"]),
        "max_connections": change["max_connections"],
    }


def server_identity(kind: str, path: str, config: dict[str, Any]) -> dict[str, Any]:
    """Which server process answers: Redis's process_id and run_id (INFO server, the user's own
    client); MySQL's PID on the host (one process under the instance's folder) and its Uptime."""
    if kind == "redis":
        client = datasets.redis_client(config)
        try:
            info = client.info("server")
        finally:
            client.close()
        return {"pid": info["process_id"], "run_id": info["run_id"], "uptime": info["uptime_in_seconds"]}
    with datasets.mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
        uptime = int(cursor.fetchone()[1])
    return {"pid": server_pid("mysql", int(path.rsplit("/", 1)[1])), "uptime": uptime}


def same_process(before: dict[str, Any], after: dict[str, Any]) -> bool:
    same_ids = all(before[key] == after[key] for key in before if key != "uptime")
    return same_ids and after["uptime"] >= before["uptime"]


# The baseline: a setting applied by restart -------------------------------------------


def restart(
    api: Api, kind: str, path: str, config: dict[str, Any], *, databases: int, live: dict[str, Any]
) -> tuple[float, float]:
    """Seconds from the request to `running`, and to the first login with the user's credentials.
    Redis: PATCH `databases` with ?apply=now; MySQL: POST …/restart. Then the server must be a new
    process with nothing pending, the new `databases` in effect, and `live` (the last live change)
    still in effect."""
    before = server_identity(kind, path, config)
    started = time.perf_counter()
    if kind == "redis":
        status, body = api.request("PATCH", f"{path}?apply=now", {"databases": databases})
    else:
        status, body = api.request("POST", f"{path}/restart")
    if status != 202:
        raise RuntimeError(f"the {kind} restart at {path} answered {status}: {body}")
    detail = poll_running(api, path, started)
    running = time.perf_counter() - started
    wait_for_login(kind, config, deadline=started + TIMEOUT)
    login = time.perf_counter() - started
    if detail["pending_options"]:
        raise RuntimeError(f"{kind} {path} is running with options still pending: {detail['pending_options']}")
    after = server_identity(kind, path, config)
    if same_process(before, after):
        raise RuntimeError(f"{kind} {path}: the restart left the same server process ({after})")
    check(read_settings(kind, config), expected_settings(kind, live), f"{kind} {path}'s live change after a restart")
    if kind == "redis":
        check(read_databases(config), databases, f"redis {path}'s databases after PATCH ?apply=now")
    return running, login


def poll_running(api: Api, path: str, started: float) -> dict:
    """Poll every POLL_INTERVAL (as a create is timed) until `running`."""
    while True:
        status, body = api.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body}")
        if body["status"] == "running":
            return body
        if body["status"] != "restarting":
            raise RuntimeError(f"{path} is {body['status']}: {body['status_message']}")
        if time.perf_counter() > started + TIMEOUT:
            raise TimeoutError(f"{path} still restarting after {TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)


def read_databases(config: dict[str, Any]) -> int:
    client = datasets.redis_client(config)
    try:
        return int(client.config_get("databases")["databases"])
    finally:
        client.close()


# The data -----------------------------------------------------------------------------


def fingerprint(kind: str, config: dict[str, Any], rows: int) -> dict[str, Any]:
    return datasets.mysql_fingerprint(config) if kind == "mysql" else datasets.redis_fingerprint(config, rows)


LOADERS = {"mysql": datasets.load_mysql, "redis": datasets.load_redis}
