"""The data the snapshot section copies: `count` rows (MySQL) or keys (Redis) of 1,000 bytes each,
written with the clients a user has (PyMySQL, redis-py), and a fingerprint to prove that a copy
holds exactly them.

The data is the same in every run (a seeded generator), so the portal's instance and the naive
baseline's server hold the same bytes. MySQL rows are base64 text (as incompressible as text gets,
and what `mariadb-dump` writes as is); Redis values are random bytes (the RDB's compression gains
nothing on them).
"""

import base64
import hashlib
import random
from collections.abc import Iterator
from typing import Any

import pymysql
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

ROW_BYTES = 1000  # per row's payload, per key's value
BATCH = 1000  # rows per INSERT statement, keys per pipeline
SEED = 13
TABLE = "bench_rows"
WRITES = "bench_writes"  # the table (MySQL) or key prefix (Redis) of the point-in-time section's writes
SPOILER = "written_after_snapshot"  # a table or key that only exists after the snapshot was taken
TIMEOUT = 120  # seconds of silence before a client gives up: a big statement is slow on a small server


def _payloads(count: int) -> Iterator[bytes]:
    generator = random.Random(SEED)
    for _ in range(count):
        yield generator.randbytes(ROW_BYTES)


def write_payload(number: int) -> bytes:
    """The value of write `number` of the point-in-time section: its own 1,000 bytes, the same in
    every run."""
    return random.Random(SEED * 1_000_003 + number).randbytes(ROW_BYTES)


def _text(payload: bytes) -> str:
    return base64.b64encode(payload[: ROW_BYTES * 3 // 4]).decode()  # 1,000 characters, no escaping needed


# MySQL --------------------------------------------------------------------------------


def mysql_client(config: dict[str, Any]) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        autocommit=True,
        connect_timeout=10,
        read_timeout=TIMEOUT,
        write_timeout=TIMEOUT,
    )


def load_mysql(config: dict[str, Any], count: int) -> None:
    """One table of `count` rows: an id, an indexed number and 1,000 characters of base64 text,
    inserted 1,000 rows per statement, one commit each (as an import script would)."""
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, k INT NOT NULL, payload VARCHAR({ROW_BYTES}) NOT NULL,"
            " KEY (k)) ENGINE=InnoDB CHARACTER SET ascii"
        )
        rows = []
        for number, payload in enumerate(_payloads(count)):
            rows.append(f"({number},{number * 7919 % count},'{_text(payload)}')")
            if len(rows) == BATCH:
                cursor.execute(f"INSERT INTO {TABLE} VALUES {','.join(rows)}")
                rows = []
        if rows:
            cursor.execute(f"INSERT INTO {TABLE} VALUES {','.join(rows)}")


def mysql_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The tables, and the table's row count and CHECKSUM TABLE (which reads every row)."""
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        tables = sorted(row[0] for row in cursor.fetchall())
        if TABLE not in tables:
            return {"tables": tables}
        cursor.execute(f"SELECT COUNT(*) FROM {TABLE}")
        (rows,) = cursor.fetchone()
        cursor.execute(f"CHECKSUM TABLE {TABLE}")
        checksum = cursor.fetchone()[1]
    return {"tables": tables, "rows": rows, "checksum": checksum}


def mysql_megabytes(config: dict[str, Any]) -> float:
    """What InnoDB says the table and its index take (its pages, not the payload alone)."""
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute(f"ANALYZE TABLE {TABLE}")  # the statistics are stale right after a load
        cursor.fetchall()
        cursor.execute(
            "SELECT SUM(data_length + index_length) FROM information_schema.tables WHERE table_schema = DATABASE()"
        )
        return round(int(cursor.fetchone()[0]) / 1e6, 1)


def spoil_mysql(config: dict[str, Any]) -> None:
    """The mistake a restore undoes: the table dropped, and one written that was not there."""
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute(f"DROP TABLE {TABLE}")
        cursor.execute(f"CREATE TABLE {SPOILER} (id INT PRIMARY KEY)")


def create_mysql_writes(config: dict[str, Any]) -> None:
    """The (empty) table the point-in-time section writes to after its base snapshot."""
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE {WRITES} (id INT PRIMARY KEY, payload VARCHAR({ROW_BYTES}) NOT NULL)"
            " ENGINE=InnoDB CHARACTER SET ascii"
        )


class MysqlWriter:
    """One connection that inserts one row per statement, each its own transaction (autocommit)."""

    def __init__(self, config: dict[str, Any]):
        self.db = mysql_client(config)
        self.cursor = self.db.cursor()

    def write(self, number: int) -> None:
        self.cursor.execute(f"INSERT INTO {WRITES} VALUES ({number},'{_text(write_payload(number))}')")

    def close(self) -> None:
        self.cursor.close()
        self.db.close()


def mysql_writes_fingerprint(config: dict[str, Any]) -> dict[str, Any]:
    """The writes table's row count and a SHA-256 over its rows in id order (absent: no rows)."""
    digest = hashlib.sha256()
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute("SHOW TABLES")
        if WRITES not in (row[0] for row in cursor.fetchall()):
            return {"writes": None}
        cursor.execute(f"SELECT id, payload FROM {WRITES} ORDER BY id")
        rows = cursor.fetchall()
    for number, payload in rows:
        digest.update(f"{number}:{payload};".encode())
    return {"writes": len(rows), "writes_sha256": digest.hexdigest()}


def mysql_writes_expected(present: list[int]) -> dict[str, Any]:
    """What mysql_writes_fingerprint gives when exactly the writes `present` are in the table."""
    digest = hashlib.sha256()
    for number in sorted(present):
        digest.update(f"{number}:{_text(write_payload(number))};".encode())
    return {"writes": len(present), "writes_sha256": digest.hexdigest()}


# Redis --------------------------------------------------------------------------------


def redis_client(config: dict[str, Any]) -> redis.Redis:
    return redis.Redis(
        host=config["host"],
        port=config["port"],
        username=config.get("username"),
        password=config.get("password"),
        socket_timeout=TIMEOUT,
        socket_connect_timeout=10,
        retry=Retry(NoBackoff(), 0),
    )


def _key(number: int) -> str:
    return f"row:{number:08d}"


def load_redis(config: dict[str, Any], count: int) -> None:
    """`count` string keys of 1,000 random bytes each, 1,000 keys per MSET, pipelined."""
    client = redis_client(config)
    try:
        pipeline = client.pipeline(transaction=False)
        batch: dict[str, bytes] = {}
        for number, payload in enumerate(_payloads(count)):
            batch[_key(number)] = payload
            if len(batch) == BATCH:
                pipeline.mset(batch)
                batch = {}
                if len(pipeline) == 8:
                    pipeline.execute()
        if batch:
            pipeline.mset(batch)
        pipeline.execute()
    finally:
        client.close()


def redis_fingerprint(config: dict[str, Any], count: int) -> dict[str, Any]:
    """The number of keys, whether the spoiler is there, and a SHA-256 over the `count` expected
    keys' values in order (read back with MGET): equal only if every value came back."""
    client = redis_client(config)
    digest = hashlib.sha256()
    try:
        keys = client.dbsize()
        spoiled = bool(client.exists(SPOILER))
        for first in range(0, count, BATCH):
            for value in client.mget([_key(n) for n in range(first, min(first + BATCH, count))]):
                digest.update(b"-" if value is None else b"+" + value)
    finally:
        client.close()
    return {"keys": keys, "spoiler": spoiled, "sha256": digest.hexdigest()}


def _write_key(number: int) -> str:
    return f"{WRITES}:{number:08d}"


class RedisWriter:
    """One connection that writes one key per command (SET, no pipeline)."""

    def __init__(self, config: dict[str, Any]):
        self.client = redis_client(config)

    def write(self, number: int) -> None:
        self.client.set(_write_key(number), write_payload(number))

    def close(self) -> None:
        self.client.close()


def redis_writes_fingerprint(config: dict[str, Any], written: int) -> dict[str, Any]:
    """A SHA-256 over the values of writes 0 to `written` - 1 in order (absent ones marked)."""
    client = redis_client(config)
    digest = hashlib.sha256()
    try:
        for first in range(0, written, BATCH):
            for value in client.mget([_write_key(n) for n in range(first, min(first + BATCH, written))]):
                digest.update(b"-" if value is None else b"+" + value)
    finally:
        client.close()
    return {"writes_sha256": digest.hexdigest()}


def redis_writes_expected(present: list[int], written: int) -> dict[str, Any]:
    """What redis_writes_fingerprint gives when exactly the writes `present` are there."""
    digest = hashlib.sha256()
    there = set(present)
    for number in range(written):
        digest.update(b"+" + write_payload(number) if number in there else b"-")
    return {"writes_sha256": digest.hexdigest()}


def spoil_redis(config: dict[str, Any]) -> None:
    """The mistake a restore undoes: every key deleted (FLUSHALL is not the tenant's to run), and
    one written that was not there."""
    client = redis_client(config)
    try:
        for keys in _batches(client.scan_iter(count=BATCH)):
            client.unlink(*keys)
        client.set(SPOILER, b"1")
    finally:
        client.close()


def _batches(keys: Iterator[bytes]) -> Iterator[list[bytes]]:
    batch = []
    for key in keys:
        batch.append(key)
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
