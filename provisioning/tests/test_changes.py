"""Changes after create, against real servers: PATCH applies live options to the running server
(the same process, read back with the user's own client), keeps restart ones pending until a
restart, refuses create-only ones and bad values with nothing changed, and resizes memory live."""

import pymysql
import pytest
import redis

from provisioning.backends.base import get_backend
from provisioning.backends.local import _cgroup
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance

from .conftest import wait_for_status
from .test_reconcile_pass import delete_what_each_test_made  # noqa: F401 - autouse: no instance outlives its test

pytestmark = pytest.mark.django_db(transaction=True)
MiB = 1024 * 1024


def running(api, kind: str, body: dict | None = None) -> tuple[int, dict]:
    response = api.post(f"/api/storage/{kind}/instances", body or {}, format="json")
    assert response.status_code == 202, response.content
    pk = response.json()["id"]
    instance = wait_for_status(api, kind, pk, "running", "failed")
    assert instance["status"] == "running", instance["status_message"]
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def patch(api, kind: str, pk: int, body: dict, query: str = ""):
    return api.patch(f"/api/storage/{kind}/instances/{pk}{query}", body, format="json")


def redis_client(config: dict) -> redis.Redis:
    return redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)


def mysql_client(config: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
    )


def server_pids(kind: str, pk: int) -> set[int]:
    instance = Instance.objects.get(pk=pk)
    return get_backend(instance.backend).instance_pids(instance)


def cgroup_limit(kind: str, pk: int) -> int | None:
    backend = get_backend()
    if backend.no_cgroups:
        return None
    return backend.cgroups.memory_limit(_cgroup(kind, pk))


def test_a_live_redis_change_reaches_the_same_server_and_its_memory_limit(api):
    pk, config = running(api, "redis")
    pids = server_pids("redis", pk)
    before = Instance.objects.get(pk=pk)

    response = patch(api, "redis", pk, {"maxmemory": "128mb", "timeout": 300, "notify_keyspace_events": "Ex"})

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["options"]["maxmemory"] == 128 * MiB and body["pending_options"] == {}
    client = redis_client(config)
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * MiB)}
    assert client.config_get("timeout") == {"timeout": "300"}
    assert set(client.config_get("notify-keyspace-events")["notify-keyspace-events"]) == set("Ex")
    assert server_pids("redis", pk) == pids, "a live change must not restart the server"
    after = Instance.objects.get(pk=pk)
    assert after.memory_reservation == before.memory_reservation + 64 * MiB
    assert after.memory_limit > before.memory_limit
    if (limit := cgroup_limit("redis", pk)) is not None:
        assert limit == after.memory_limit
    assert client.set("still", "here") and client.get("still") == b"here"
    events = api.get(f"/api/storage/redis/instances/{pk}/events").json()["results"]
    assert any("maxmemory 64mb → 128mb" in event["reason"] for event in events), events


def test_a_restart_option_waits_for_the_restart_and_a_mixed_patch_does_each_right(api):
    pk, config = running(api, "redis")
    pids = server_pids("redis", pk)
    client = redis_client(config)
    client.set("kept", "1")

    response = patch(api, "redis", pk, {"databases": 32, "maxmemory_policy": "allkeys-lru"})

    assert response.status_code == 202, response.content
    assert response.json()["pending_options"] == {"databases": 32}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert client.config_get("databases") == {"databases": "16"}, "a restart option must wait"
    assert server_pids("redis", pk) == pids

    response = patch(api, "redis", pk, {}, query="?apply=now")
    assert response.status_code == 202
    assert wait_for_status(api, "redis", pk, "running", "unhealthy", "failed")["status"] == "running"
    client = redis_client(config)
    assert client.config_get("databases") == {"databases": "32"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert client.get("kept") == b"1"
    instance = api.get(f"/api/storage/redis/instances/{pk}").json()
    assert instance["pending_options"] == {} and instance["options"]["databases"] == 32


def test_setting_a_pending_option_back_clears_it(api):
    pk, _config = running(api, "redis")
    assert patch(api, "redis", pk, {"databases": 8}).json()["pending_options"] == {"databases": 8}
    assert patch(api, "redis", pk, {"databases": None}).json()["pending_options"] == {}


def test_a_live_mysql_change_reaches_new_sessions_of_the_same_server(api):
    pk, config = running(api, "mysql")
    pids = server_pids("mysql", pk)

    response = patch(
        api,
        "mysql",
        pk,
        {
            "options": {"max_connections": 150, "sql_mode": "ANSI_QUOTES,STRICT_ALL_TABLES"},
            "innodb_buffer_pool_size": "64mb",
            "wait_timeout": 600,
            "long_query_time": 0.5,
            "slow_query_log": "ON",
            "time_zone": "+02:00",
        },
    )

    assert response.status_code == 202, response.content
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute(
            "SELECT @@GLOBAL.max_connections, @@SESSION.sql_mode, @@GLOBAL.innodb_buffer_pool_size, "
            "@@SESSION.wait_timeout, @@GLOBAL.long_query_time, @@GLOBAL.slow_query_log, @@SESSION.time_zone"
        )
        assert cursor.fetchone() == (150, "ANSI_QUOTES,STRICT_ALL_TABLES", 64 * MiB, 600, 0.5, 1, "+02:00")
        cursor.execute('CREATE TABLE "quoted" (id INT PRIMARY KEY)')  # ANSI_QUOTES is in force
        cursor.execute('INSERT INTO "quoted" VALUES (1)')
        db.commit()
        cursor.execute('SELECT id FROM "quoted"')
        assert cursor.fetchall() == ((1,),)
    assert server_pids("mysql", pk) == pids
    instance = Instance.objects.get(pk=pk)
    assert instance.memory_reservation == 64 * MiB + 48 * MiB
    if (limit := cgroup_limit("mysql", pk)) is not None:
        assert limit == instance.memory_limit == 64 * MiB + 496 * MiB


def test_bad_values_and_create_only_options_get_400_and_change_nothing(api, outsider):
    pk, config = running(api, "redis")

    for body, field in [
        ({"maxmemory": "1tb", "timeout": 5}, "maxmemory"),
        ({"maxmemory_policy": "sometimes"}, "maxmemory_policy"),
        ({"disk": "2gb"}, "disk"),
        ({"no_such_option": 1}, "no_such_option"),
        ({"options": {"maxclients": "many"}}, "maxclients"),
    ]:
        response = patch(api, "redis", pk, body)
        assert response.status_code == 400, (body, response.content)
        assert field in response.json(), response.json()
    assert "create-only" in patch(api, "redis", pk, {"disk": "2gb"}).json()["disk"][0]
    assert patch(api, "redis", pk, {}, query="?apply=later").status_code == 400
    client = redis_client(config)
    assert client.config_get("timeout") == {"timeout": "0"}, "nothing of a refused patch may be applied"
    assert client.config_get("maxmemory") == {"maxmemory": str(64 * MiB)}
    assert patch(outsider, "redis", pk, {"timeout": 5}).status_code == 404


def test_mysql_charset_is_create_only(api):
    pk, _config = running(api, "mysql")
    response = patch(api, "mysql", pk, {"charset": "latin1"})
    assert response.status_code == 400
    assert "create-only" in response.json()["charset"][0]
    assert patch(api, "mysql", pk, {"charset": "utf8mb4"}).status_code == 202, "the same value is no change"


def test_a_change_past_the_memory_quota_gets_403_and_changes_nothing(api, settings):
    pk, config = running(api, "redis")
    settings.STOCKROOM_MEMORY_QUOTA = 200 * MiB
    response = patch(api, "redis", pk, {"maxmemory": "512mb"})
    assert response.status_code == 403, response.content
    assert redis_client(config).config_get("maxmemory") == {"maxmemory": str(64 * MiB)}
    assert Instance.objects.get(pk=pk).memory_reservation == 80 * MiB


def test_a_limit_below_what_the_server_uses_is_refused(api):
    pk, config = running(api, "redis", {"maxmemory": "256mb"})
    if cgroup_limit("redis", pk) is None:
        pytest.skip("no cgroups here: the kernel's limit is not enforced")
    client = redis_client(config)
    for n in range(4):  # 100 MiB in use: more than the limit of a 1mb server (65.5 MiB)
        client.set(f"big{n}", b"x" * (25 * MiB))
    response = patch(api, "redis", pk, {"maxmemory": "1mb"})
    assert response.status_code == 409, response.content
    assert "uses" in response.json()["detail"]
    assert client.config_get("maxmemory") == {"maxmemory": str(256 * MiB)}
    assert all(len(client.get(f"big{n}")) == 25 * MiB for n in range(4))


def test_a_busy_instance_gets_409(api):
    pk, _config = running(api, "redis")
    Instance.objects.filter(pk=pk).update(status="restarting")
    response = patch(api, "redis", pk, {"timeout": 5})
    assert response.status_code == 409
    assert response.json()["status"] == "restarting"
    Instance.objects.filter(pk=pk).update(status="running")


def test_a_stopped_instance_takes_every_change_at_its_next_start(api):
    pk, config = running(api, "redis")
    api.post(f"/api/storage/redis/instances/{pk}/stop")
    assert wait_for_status(api, "redis", pk, "stopped", "unhealthy")["status"] == "stopped"

    response = patch(api, "redis", pk, {"maxmemory": "96mb", "databases": 4, "name": "renamed"})
    assert response.status_code == 202, response.content
    assert response.json()["pending_options"] == {} and response.json()["name"] == "renamed"

    api.post(f"/api/storage/redis/instances/{pk}/start")
    assert wait_for_status(api, "redis", pk, "running", "stopped")["status"] == "running"
    client = redis_client(config)
    assert client.config_get("maxmemory") == {"maxmemory": str(96 * MiB)}
    assert client.config_get("databases") == {"databases": "4"}


def test_a_patch_sets_the_lifetime_with_the_options_and_a_bad_one_changes_nothing(api):
    pk, config = running(api, "redis")
    response = patch(api, "redis", pk, {"timeout": 7, "expires_in": "2h", "protected": True})
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["protected"] is True and body["expires_at"] is not None
    assert redis_client(config).config_get("timeout") == {"timeout": "7"}

    response = patch(api, "redis", pk, {"timeout": 9, "stop_when_idle": "soon"})
    assert response.status_code == 400 and "stop_when_idle" in response.json()
    assert redis_client(config).config_get("timeout") == {"timeout": "7"}, "a bad lifetime must stop the whole patch"
    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 409
    assert patch(api, "redis", pk, {"protected": False, "expires_in": None}).json()["expires_at"] is None


def test_a_named_time_zone_the_data_lacks_is_said_and_the_server_still_starts(api):
    pk, config = running(api, "mysql", {"time_zone": "Europe/Paris"})
    with mysql_client(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT @@GLOBAL.time_zone")
        assert cursor.fetchone() == ("Europe/Paris",)
        # Data made before the zone tables were loaded (an old instance, an old snapshot): none.
    instance = Instance.objects.get(pk=pk)
    backend = get_backend(instance.backend)
    with backend.admin(instance) as admin:
        from provisioning.engines.mysql import ADMIN_USERNAME, MySQL

        with MySQL.client(admin, user=ADMIN_USERNAME, password=instance.admin_password) as db, db.cursor() as cursor:
            cursor.execute("SET SESSION sql_log_bin = 0")
            cursor.execute("DELETE FROM mysql.time_zone_name")
    api.post(f"/api/storage/mysql/instances/{pk}/restart")
    after = wait_for_status(api, "mysql", pk, "running", "unhealthy", "failed")
    assert after["status"] == "running", after["status_message"]
    assert "time_zone 'Europe/Paris' was not set" in after["status_message"]
