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
SPOILER = "written_after_snapshot"  # a table or key that only exists after the snapshot was taken
TIMEOUT = 120  # seconds of silence before a client gives up: a big statement is slow on a small server


def _payloads(count: int) -> Iterator[bytes]:
    generator = random.Random(SEED)
    for _ in range(count):
        yield generator.randbytes(ROW_BYTES)


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
            text = base64.b64encode(payload[: ROW_BYTES * 3 // 4]).decode()  # 1,000 characters
            rows.append(f"({number},{number * 7919 % count},'{text}')")  # base64 needs no escaping
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
