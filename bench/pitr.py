"""6. Point-in-time restore of a 100 MB MySQL database and a 100 MB Redis after 10,000 writes
that came after the base snapshot, next to a restore of that base snapshot alone, in the same run.

Per kind, one instance is created through the API and filled with `count` rows or keys of 1,000
bytes (bench.datasets, as bench.snapshots does; for MySQL also an empty table for the writes).
Then, `repeats` times:
- a snapshot is taken, the base (untimed; POST to `ready`);
- `writes` writes, one row (`INSERT`, autocommit) or key (`SET`) per statement from one client,
  paced over `seconds` seconds. When half of them are done, T is the next whole second: the next
  write waits until T has begun (and MARGIN more), so every write either was answered before T or
  was sent after it, and exactly the first half are "before T". A write in flight across T stops
  the bench (it could be either);
- the data is spoiled as in bench.snapshots (the table dropped or every key deleted, and something
  new written): the mistake a point-in-time restore undoes;
- clone to T: from `POST …/instances` with `{"from_instance": id, "time": T}` to the first login
  with the clone's credentials; the clone must hold the base data and exactly the writes before T.
  It is deleted again;
- point-in-time restore: from `POST …/restore` with `{"time": T}` to `running`, then to the first
  read answered; then the data must be the base data and exactly the writes before T: row count and
  CHECKSUM TABLE of the base table (or key count and a SHA-256 of its values), plus the writes' count
  and a SHA-256 over them read back, absent ones included;
- the baseline: the data spoiled again, then a restore of the base snapshot itself
  (`{"snapshot": id}`), timed the same way and checked to hold the base data and none of the
  writes. Spoiled first like the other, because what a restore replaces costs too (a Redis saves
  its whole dataset to an RDB when it is stopped). Both restores put the base in place and
  take the new timeline's first base before `running`; the point-in-time one also archives the log
  first and replays it up to T, so the ratio is what point in time costs over a snapshot restore.
A time whose data check failed is not a number: the bench stops with an error instead.
"""

import math
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from . import datasets, report
from .client import Api, create_and_connect, delete_all
from .snapshots import MEMORY_FOR_REDIS, POLL, check, restore, settle, take_snapshot

MARGIN = 0.25  # seconds between T beginning and the next write, and between a write's answer and T


def run(token: str, *, count: int, writes: int, seconds: float, repeats: int) -> dict:
    results: dict[str, Any] = {
        "rows_or_keys": count,
        "row_bytes": datasets.ROW_BYTES,
        "writes": writes,
        "write_seconds": seconds,
        "repeats": repeats,
    }
    for kind in ("mysql", "redis"):
        results[kind] = measure(token, kind, count=count, writes=writes, seconds=seconds, repeats=repeats)
    return results


class Data:
    """What the instance should hold: the base data, and which of the writes made so far."""

    def __init__(self, kind: str, config: dict[str, Any], count: int):
        self.kind, self.count = kind, count
        if kind == "mysql":
            datasets.create_mysql_writes(config)
            self.base = datasets.mysql_fingerprint(config)
        else:
            self.base = datasets.redis_fingerprint(config, count)
        self.made = 0  # writes 0 to made - 1 were made, over every round

    def found(self, config: dict[str, Any]) -> dict[str, Any]:
        if self.kind == "mysql":
            return datasets.mysql_fingerprint(config) | datasets.mysql_writes_fingerprint(config)
        return datasets.redis_fingerprint(config, self.count) | datasets.redis_writes_fingerprint(config, self.made)

    def expected(self, present: list[int]) -> dict[str, Any]:
        if self.kind == "mysql":
            return self.base | datasets.mysql_writes_expected(present)
        keys = {"keys": self.base["keys"] + len(present)}
        return self.base | keys | datasets.redis_writes_expected(present, self.made)


def measure(token: str, kind: str, *, count: int, writes: int, seconds: float, repeats: int) -> dict:
    spoil = SPOILERS[kind]
    options = {"maxmemory": MEMORY_FOR_REDIS} if kind == "redis" else {}
    source = create_and_connect(token, kind, options)
    api = Api(token)
    path = f"/api/storage/{kind}/instances/{source.id}"
    try:
        config = api.request("GET", f"{path}/config")[1]
        report.progress(f"point in time: loading {count:,} × {datasets.ROW_BYTES:,} bytes into {kind}")
        LOADERS[kind](config, count)
        data = Data(kind, config, count)
        size = datasets.mysql_megabytes(config) if kind == "mysql" else round(count * datasets.ROW_BYTES / 1e6, 1)
        numbers: dict[str, list[float]] = {
            name: [] for name in ("pitr_to_running", "pitr", "clone", "snapshot_to_running", "snapshot_restore")
        }
        spreads = []
        for repeat in range(repeats):
            report.progress(f"point in time: {kind} base, {writes:,} writes, clone, restores ({repeat + 1}/{repeats})")
            settle(kind, source.id)
            _, base = take_snapshot(api, kind, source.id)  # the instance holds the base data and no write
            first = data.made
            moment, before, spread = write(WRITERS[kind](config), first, writes, seconds)
            data.made += writes
            spreads.append(spread)
            spoil(config)
            at = {"time": datetime.fromtimestamp(moment, UTC).isoformat()}
            present = list(range(first, first + before))
            clone = create_and_connect(token, kind, {"from_instance": source.id} | at, poll=POLL)
            try:
                numbers["clone"].append(clone.seconds)
                clone_config = api.request("GET", f"/api/storage/{kind}/instances/{clone.id}/config")[1]
                check(data.found(clone_config), data.expected(present), f"{kind} clone {clone.id} as of {at['time']}")
            finally:
                delete_all(token, [clone])
            running, served = restore(api, kind, source.id, at, config)
            numbers["pitr_to_running"].append(running)
            numbers["pitr"].append(served)
            check(data.found(config), data.expected(present), f"{kind} {source.id} restored to {at['time']}")
            settle(kind, source.id)
            spoil(config)  # the same mistake again: a restore also pays for stopping what it replaces
            running, served = restore(api, kind, source.id, {"snapshot": base["id"]}, config)
            numbers["snapshot_to_running"].append(running)
            numbers["snapshot_restore"].append(served)
            check(data.found(config), data.expected([]), f"{kind} {source.id} restored to snapshot {base['id']}")
    finally:
        api.close()
        delete_all(token, [source])
    medians = {name: statistics.median(values) for name, values in numbers.items()}
    return {
        "data_mb": size,
        "writes_before_time": writes // 2,
        "write_spread_seconds": round(statistics.median(spreads), 2),
        **{name: _seconds(values) for name, values in numbers.items()},
        "pitr_over_snapshot_restore": round(medians["pitr"] / medians["snapshot_restore"], 2),
        "pitr_minus_snapshot_restore_seconds": round(medians["pitr"] - medians["snapshot_restore"], 2),
    }


def _seconds(values: list[float]) -> dict:
    return {"median_seconds": round(statistics.median(values), 2), "max_seconds": round(max(values), 2)}


def write(writer: Any, first: int, writes: int, seconds: float) -> tuple[int, int, float]:
    """Make writes `first` to `first + writes - 1`, one every `seconds / writes` seconds (or as fast
    as they go, if slower). Returns T (a whole second, Unix time), how many were answered before T
    (the first half: T is the first whole second at least MARGIN after the middle write's answer, and
    the next write waits until MARGIN after T began), and the seconds from the first write to the last
    answer."""
    try:
        started = answered = time.time()
        moment = math.inf
        for offset in range(writes):
            due = started + offset * seconds / writes
            if offset == writes // 2:
                moment = math.floor(answered + MARGIN) + 1
                due = max(due, moment + MARGIN)
            if (wait := due - time.time()) > 0:
                time.sleep(wait)
            sent = time.time()
            writer.write(first + offset)
            answered = time.time()
            if sent < moment <= answered:  # cannot happen with the waits above; checked, not assumed
                raise RuntimeError(f"write {first + offset} was in flight across T = {moment}")
        return int(moment), writes // 2, answered - started
    finally:
        writer.close()


SPOILERS = {"mysql": datasets.spoil_mysql, "redis": datasets.spoil_redis}
LOADERS = {"mysql": datasets.load_mysql, "redis": datasets.load_redis}
WRITERS = {"mysql": datasets.MysqlWriter, "redis": datasets.RedisWriter}
