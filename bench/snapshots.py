"""6. Snapshot, restore in place and clone of a 100 MB MySQL database and a 100 MB Redis, next to
the naive way of copying the data out and back in, measured in the same run.

Per kind, one instance is created through the API and filled with `count` rows or keys of 1,000
bytes (bench.datasets). Then, `repeats` times:
- snapshot: from `POST …/instances/{id}/snapshots` to the snapshot's status `ready`;
- the data is spoiled (the table dropped or every key deleted, and something new written);
- restore: from `POST …/instances/{id}/restore` to the instance's status `running` and then the
  first command that reads the data answered (a SELECT from the table, or DBSIZE, which a Redis
  still loading refuses; the time to `running` alone is kept too); then the data must be exactly
  the snapshot's (row count and CHECKSUM TABLE, or key count and a SHA-256 of every value), and
  what was written after the snapshot gone;
- clone: from `POST /api/storage/{kind}/instances` with `{"from_snapshot": id}` to the first login
  with the clone's credentials (PyMySQL `SELECT 1`, or redis-py PING, which a loading Redis refuses
  too); then the clone must hold the same data. It is deleted again.
A time whose data check failed is not a number: the bench stops with an error instead.

The naive baselines, once per kind:
- MySQL: `mariadb-dump --single-transaction app | mariadb app`, from the portal instance into a new
  empty one (made through the API beforehand, untimed), as the tenant; timed from starting the
  pipe until both ends are done, then checked like a clone.
- Redis: a tenant may not run SYNC (it is @dangerous), so this runs on a bare `redis-server` of the
  bench's own holding the same data: `redis-cli --rdb` (the server forks and streams an RDB) and a
  new `redis-server` started on that file, timed until it answers (after loading it), then checked.
Each is a save plus a load into a fresh server, so it is compared with snapshot + clone, and with
snapshot + restore, the portal's two ways to get a copy of the data back.
"""

import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import datasets, report
from .client import POLL_INTERVAL, Api, Created, create_and_connect, delete_all, wait_for_login
from .density import server_pid
from .stack import BASELINE_PORTS, give_to_run_as, run_as_kwargs, wait_until

TIMEOUT = 300.0  # seconds a snapshot, restore or clone may take before the bench gives up
# Seconds between status polls: these take seconds, and a poll every 20 ms (as section 1 does) would
# take a good part of a core from the worker on a 2-core machine.
POLL = 0.1
MEMORY_FOR_REDIS = "512mb"  # maxmemory of the Redis instance: the data, with room for the fork


def run(token: str, *, count: int, repeats: int) -> dict:
    results: dict[str, Any] = {"rows_or_keys": count, "row_bytes": datasets.ROW_BYTES, "repeats": repeats}
    for kind in ("mysql", "redis"):
        results[kind] = measure(token, kind, count=count, repeats=repeats)
    return results


def measure(token: str, kind: str, *, count: int, repeats: int) -> dict:
    spoil, fingerprint = FUNCTIONS[kind]
    options = {"maxmemory": MEMORY_FOR_REDIS} if kind == "redis" else {}
    source = create_and_connect(token, kind, options)
    api = Api(token)
    path = f"/api/storage/{kind}/instances/{source.id}"
    try:
        config = api.request("GET", f"{path}/config")[1]
        report.progress(f"snapshots: loading {count:,} × {datasets.ROW_BYTES:,} bytes into {kind}")
        started = time.perf_counter()
        LOADERS[kind](config, count)
        loaded = time.perf_counter() - started
        expected = fingerprint(config, count)
        size = datasets.mysql_megabytes(config) if kind == "mysql" else round(count * datasets.ROW_BYTES / 1e6, 1)
        settle(kind, source.id)
        numbers: dict[str, list[float]] = {"snapshot": [], "restore_to_running": [], "restore": [], "clone": []}
        sizes = []
        for repeat in range(repeats):
            report.progress(f"snapshots: {kind} snapshot, restore and clone ({repeat + 1} of {repeats})")
            seconds, snapshot = take_snapshot(api, kind, source.id)
            numbers["snapshot"].append(seconds)
            sizes.append(snapshot["size_bytes"])
            spoil(config)
            running, served = restore(api, kind, source.id, {"snapshot": snapshot["id"]}, config)
            numbers["restore_to_running"].append(running)
            numbers["restore"].append(served)
            check(fingerprint(config, count), expected, f"{kind} {source.id} after its restore")
            clone = create_and_connect(token, kind, {"from_snapshot": snapshot["id"]}, poll=POLL)
            try:
                numbers["clone"].append(clone.seconds)
                clone_config = api.request("GET", f"/api/storage/{kind}/instances/{clone.id}/config")[1]
                check(fingerprint(clone_config, count), expected, f"{kind} clone {clone.id}")
            finally:
                delete_all(token, [clone])
            settle(kind, source.id)
        report.progress(f"snapshots: {kind} naive baseline")
        baseline = BASELINES[kind](token, config, count, expected)
    finally:
        api.close()
        delete_all(token, [source])
    medians = {name: statistics.median(values) for name, values in numbers.items()}
    return {
        "data_mb": size,
        "load_seconds": round(loaded, 2),
        "snapshot_mb": round(statistics.median(sizes) / 1e6, 1),
        **{name: _seconds(values) for name, values in numbers.items()},
        "baseline_seconds": round(baseline, 2),
        "baseline_over_snapshot_and_restore": round(baseline / (medians["snapshot"] + medians["restore"]), 2),
        "baseline_over_snapshot_and_clone": round(baseline / (medians["snapshot"] + medians["clone"]), 2),
    }


def _seconds(values: list[float]) -> dict:
    return {"median_seconds": round(statistics.median(values), 2), "max_seconds": round(max(values), 2)}


def settle(kind: str, instance_id: int) -> None:
    """Wait until the server has no child process: Redis rewrites its append-only file in a fork
    after a big load, and a snapshot would first wait for that rewrite to end."""
    if kind == "redis":
        wait_until(
            lambda: _alone(kind, instance_id), timeout=TIMEOUT, what=f"redis {instance_id}'s rewrite", interval=0.1
        )


def _alone(kind: str, instance_id: int) -> bool:
    try:
        server_pid(kind, instance_id)
    except RuntimeError:
        return False
    return True


def check(found: dict, expected: dict, what: str) -> None:
    if found != expected:
        raise RuntimeError(f"{what} does not hold the data it should: {found} instead of {expected}")


# The portal's side --------------------------------------------------------------------


def poll(api: Api, path: str, *, until: str, passing: tuple[str, ...], started: float) -> dict:
    """GET `path` every POLL seconds until its status is `until`; an error for any status not in
    `passing`, or after TIMEOUT."""
    while True:
        status, body = api.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} answered {status}: {body}")
        if body["status"] == until:
            return body
        if body["status"] not in passing:
            raise RuntimeError(f"{path} is {body['status']}: {body['status_message']}")
        if time.perf_counter() > started + TIMEOUT:
            raise TimeoutError(f"{path} still {body['status']} after {TIMEOUT:g} s")
        time.sleep(POLL)


def take_snapshot(api: Api, kind: str, instance_id: int) -> tuple[float, dict]:
    """Seconds from the POST to the snapshot being `ready`, and the snapshot."""
    started = time.perf_counter()
    status, body = api.request("POST", f"/api/storage/{kind}/instances/{instance_id}/snapshots")
    if status != 202:
        raise RuntimeError(f"POST a {kind} snapshot answered {status}: {body}")
    snapshot = poll(
        api, f"/api/storage/{kind}/snapshots/{body['id']}", until="ready", passing=("creating",), started=started
    )
    return time.perf_counter() - started, snapshot


def restore(api: Api, kind: str, instance_id: int, to: dict[str, Any], config: dict[str, Any]) -> tuple[float, float]:
    """Seconds from the POST to the instance being `running` again, and to the data being served.
    `to` is the POST's body: `{"snapshot": id}`, or `{"time": …}` (bench.pitr).

    The two differ for Redis: the portal's login check (ECHO, which a full disk does not refuse)
    passes while the server is still loading its data, and answers every data command with
    LOADING meanwhile. The user can use the instance only once it has loaded.
    """
    started = time.perf_counter()
    path = f"/api/storage/{kind}/instances/{instance_id}"
    status, body = api.request("POST", f"{path}/restore", to)
    if status != 202:
        raise RuntimeError(f"POST a {kind} restore answered {status}: {body}")
    poll(api, path, until="running", passing=("restoring",), started=started)
    running = time.perf_counter() - started
    wait_until(
        lambda: serves(kind, config), timeout=TIMEOUT, what=f"{kind} {instance_id}'s data", interval=POLL_INTERVAL
    )
    return running, time.perf_counter() - started


def serves(kind: str, config: dict[str, Any]) -> bool:
    """Whether one command that reads the data succeeds (DBSIZE, or a SELECT from the table)."""
    try:
        if kind == "redis":
            client = datasets.redis_client(config)
            try:
                client.dbsize()
            finally:
                client.close()
        else:
            with datasets.mysql_client(config) as db, db.cursor() as cursor:
                cursor.execute(f"SELECT id FROM {datasets.TABLE} LIMIT 1")
    except Exception:  # noqa: BLE001 - any failure means "not yet"
        return False
    return True


# The naive baselines ------------------------------------------------------------------


def _client_options(config: dict[str, Any]) -> str:
    lines = ["[client]", f"host={config['host']}", f"port={config['port']}", f"user={config['username']}"]
    return "\n".join([*lines, f"password={config['password']}", ""])


def mysql_round_trip(token: str, config: dict[str, Any], count: int, expected: dict) -> float:
    """Seconds for `mariadb-dump | mariadb` into a new empty instance; the copy is checked."""
    target: Created = create_and_connect(token, "mysql")
    folder = Path(tempfile.mkdtemp(prefix="stockroom-bench-dump-"))  # 0700: the passwords' files
    api = Api(token)
    try:
        target_config = api.request("GET", f"/api/storage/mysql/instances/{target.id}/config")[1]
        source_options, target_options = folder / "source.cnf", folder / "target.cnf"
        source_options.write_text(_client_options(config))
        target_options.write_text(_client_options(target_config))
        started = time.perf_counter()
        dump = subprocess.Popen(
            ["mariadb-dump", f"--defaults-extra-file={source_options}", "--single-transaction", config["database"]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        load = subprocess.run(
            ["mariadb", f"--defaults-extra-file={target_options}", target_config["database"]],
            stdin=dump.stdout,
            capture_output=True,
            text=True,
        )
        dump.stdout.close()
        dumped = dump.wait()
        seconds = time.perf_counter() - started
        if dumped or load.returncode:
            raise RuntimeError(f"mariadb-dump | mariadb failed: {dump.stderr.read()!r} {load.stderr[-500:]}")
        check(datasets.mysql_fingerprint(target_config), expected, "the mariadb-dump | mariadb copy")
        return seconds
    finally:
        api.close()
        shutil.rmtree(folder, ignore_errors=True)
        delete_all(token, [target])


def redis_round_trip(token: str, config: dict[str, Any], count: int, expected: dict) -> float:
    """Seconds for `redis-cli --rdb` from a bare server holding the data, then a new bare server
    started on the file until it answers; the copy is checked."""
    root = Path(tempfile.mkdtemp(prefix="stockroom-bench-rdb-"))
    give_to_run_as(root)
    servers: list[subprocess.Popen] = []
    try:
        source, copy = ({"host": "127.0.0.1", "port": port} for port in BASELINE_PORTS[:2])
        servers.append(_bare_redis(root / "source", source["port"], "none.rdb"))
        wait_for_login("redis", source, deadline=time.perf_counter() + 30)
        datasets.load_redis(source, count)
        original = datasets.redis_fingerprint(source, count)
        check(original, expected, "the bare Redis the baseline copies")  # the same data as the portal's
        (root / "copy").mkdir()
        give_to_run_as(root / "copy")
        started = time.perf_counter()
        saved = subprocess.run(
            ["redis-cli", "-p", str(source["port"]), "--rdb", str(root / "copy" / "dump.rdb")],
            capture_output=True,
            text=True,
            **run_as_kwargs(),
        )
        if saved.returncode:
            raise RuntimeError(f"redis-cli --rdb failed: {saved.stderr or saved.stdout}")
        servers.append(_bare_redis(root / "copy", copy["port"], "dump.rdb"))
        wait_for_login("redis", copy, deadline=started + TIMEOUT)  # a loading server answers LOADING
        seconds = time.perf_counter() - started
        check(datasets.redis_fingerprint(copy, count), original, "the redis-cli --rdb copy")
        return seconds
    finally:
        for server in servers:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _bare_redis(directory: Path, port: int, file: str) -> subprocess.Popen:
    directory.mkdir(exist_ok=True)
    give_to_run_as(directory)
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    argv += ["--dbfilename", file, "--save", "", "--appendonly", "no"]
    argv += ["--repl-diskless-sync-delay", "0"]  # not 5 s waiting for more replicas to share the stream
    return subprocess.Popen(
        argv, cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        **run_as_kwargs(),
    )  # fmt: skip


FUNCTIONS: dict[str, tuple[Callable[[dict], None], Callable[[dict, int], dict]]] = {
    "mysql": (datasets.spoil_mysql, lambda config, count: datasets.mysql_fingerprint(config)),
    "redis": (datasets.spoil_redis, datasets.redis_fingerprint),
}
LOADERS = {"mysql": datasets.load_mysql, "redis": datasets.load_redis}
BASELINES = {"mysql": mysql_round_trip, "redis": redis_round_trip}
