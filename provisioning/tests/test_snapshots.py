"""Snapshots, restores and clones against real servers and real clients (local backend)."""

import io

import pymysql
import pytest
import redis

from provisioning.backends.base import get_backend
from provisioning.models import Instance

from .conftest import wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def create(api, kind: str, **body) -> dict:
    response = api.post(f"/api/storage/{kind}/instances", body, format="json")
    assert response.status_code == 202, response.content
    instance = wait_for_status(api, kind, response.json()["id"], "running", "failed")
    assert instance["status"] == "running", instance["status_message"]
    return instance


def config_of(api, kind: str, pk: int) -> dict:
    return api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def mysql(config: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        autocommit=True,
    )


def rows(config: dict) -> list:
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT id, note FROM t ORDER BY id")
        return [list(row) for row in cursor.fetchall()]


def execute(config: dict, *statements: str) -> None:
    with mysql(config) as db, db.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def redis_client(config: dict) -> redis.Redis:
    return redis.Redis(host=config["host"], port=config["port"], password=config["password"], decode_responses=True)


def test_the_backend_restores_a_mysql_snapshot_exactly(api):
    instance = create(api, "mysql")
    config = config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    row = Instance.objects.get(pk=instance["id"])
    backend = get_backend(row.backend)
    snapshot = io.BytesIO()
    backend.snapshot(row, snapshot)
    assert config["password"].encode() not in snapshot.getvalue()
    execute(config, "INSERT INTO t VALUES (3, 'three')", "UPDATE t SET note = 'changed' WHERE id = 1")
    snapshot.seek(0)
    backend.restore(row, snapshot)
    assert rows(config) == [[1, "one"], [2, "two"]]


def test_the_backend_restores_a_redis_snapshot_exactly(api):
    instance = create(api, "redis")
    config = config_of(api, "redis", instance["id"])
    client = redis_client(config)
    client.set("a", "1")
    client.hset("h", mapping={"x": "y"})
    row = Instance.objects.get(pk=instance["id"])
    backend = get_backend(row.backend)
    snapshot = io.BytesIO()
    backend.snapshot(row, snapshot)
    assert config["password"].encode() not in snapshot.getvalue()
    client.set("b", "2")
    client.delete("a")
    snapshot.seek(0)
    backend.restore(row, snapshot)
    client = redis_client(config)
    assert sorted(client.keys()) == ["a", "h"]
    assert client.hgetall("h") == {"x": "y"}
