"""stop / start / restart / rotate-password, end to end with real logins."""

import pymysql
import pytest
import redis

from provisioning.engines.redis import NO_RETRY, Redis

from .conftest import port_refuses, server_dir, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def running(api, kind: str, body: dict | None = None) -> tuple[int, dict]:
    pk = api.post(f"/api/storage/{kind}/instances", body or {}).json()["id"]
    assert wait_for_status(api, kind, pk, "running", "failed")["status"] == "running"
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def act(api, kind: str, pk: int, action: str, *wanted: str) -> dict:
    response = api.post(f"/api/storage/{kind}/instances/{pk}/{action}")
    assert response.status_code == 202, response.content
    return wait_for_status(api, kind, pk, *wanted)


def mysql(config: dict, password: str | None = None) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=password or config["password"],
        database=config["database"],
    )


def test_mysql_stop_start_restart_rotate(api):
    pk, config = running(api, "mysql")
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE notes (v VARCHAR(10))")
        cursor.execute("INSERT INTO notes VALUES ('kept')")
        db.commit()

    assert act(api, "mysql", pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    assert port_refuses(config["port"])
    assert api.post(f"/api/storage/mysql/instances/{pk}/stop").status_code == 409
    assert api.post(f"/api/storage/mysql/instances/{pk}/rotate-password").status_code == 409

    assert act(api, "mysql", pk, "start", "running", "stopped")["status"] == "running"
    assert act(api, "mysql", pk, "restart", "running", "unhealthy")["status"] == "running"
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT v FROM notes")
        assert cursor.fetchone() == ("kept",)

    assert act(api, "mysql", pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    new = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    assert new["password"] != config["password"] and len(new["password"]) >= 24
    mysql(new).close()
    with pytest.raises(pymysql.err.OperationalError):
        mysql(config)

    events = api.get(f"/api/storage/mysql/instances/{pk}/events?page_size=100").json()
    transitions = [(event["from"], event["to"]) for event in events["results"]]
    assert transitions == [
        ("", "provisioning"),
        ("provisioning", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
        ("stopped", "starting"),
        ("starting", "running"),
        ("running", "restarting"),
        ("restarting", "running"),
        ("running", "rotating"),
        ("rotating", "running"),
    ]
    assert events["results"][-1]["reason"] == "Password rotated; the old one no longer works."
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone")


def test_redis_rotate_and_restart_keep_data(api):
    pk, config = running(api, "redis", {"appendfsync": "always"})
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    client.set("k", "v")
    client.close()
    act(api, "redis", pk, "rotate-password", "running", "unhealthy")
    new = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY).ping()
    act(api, "redis", pk, "restart", "running", "unhealthy")
    after = redis.Redis(host=new["host"], port=new["port"], password=new["password"], retry=NO_RETRY)
    assert after.get("k") == b"v"
    after.close()
    assert act(api, "redis", pk, "stop", "stopped")["status"] == "stopped"
    # The append-only file is its only persistence: neither the restart nor the stop wrote an RDB.
    assert not (server_dir("redis", pk) / "data" / "dump.rdb").exists()
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")


def test_outsiders_get_404_for_actions_and_events(api, outsider):
    pk, _ = running(api, "redis")
    for action in ("stop", "start", "restart", "rotate-password"):
        assert outsider.post(f"/api/storage/redis/instances/{pk}/{action}").status_code == 404
    assert outsider.get(f"/api/storage/redis/instances/{pk}/events").status_code == 404
    assert api.post(f"/api/storage/redis/instances/{pk}/start").status_code == 409
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")


def test_a_rotation_that_fails_half_way_keeps_the_old_password(api, monkeypatch):
    pk, config = running(api, "redis")
    real_reload = Redis.reload_acl
    calls = []

    def reload_fails_once(self, instance, admin):
        calls.append(1)
        if len(calls) == 1:  # the new ACL file is written, but the server does not take it
            raise redis.ConnectionError("Connection reset by peer")
        real_reload(self, instance, admin)

    monkeypatch.setattr(Redis, "reload_acl", reload_fails_once)
    after = act(api, "redis", pk, "rotate-password", "unhealthy", "running")
    assert after["status"] == "unhealthy"
    assert after["status_message"] == "Password rotation failed: unexpected ConnectionError; " + (
        "an operator can find details in the worker log."
    )
    assert api.get(f"/api/storage/redis/instances/{pk}/config").json()["password"] == config["password"]
    # The file on disk has the old password again, so a restart does not lock the user out.
    act(api, "redis", pk, "restart", "running", "failed")
    assert redis.Redis(port=config["port"], password=config["password"], retry=NO_RETRY).ping()
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")
