"""The warm pool, against real servers: a create takes a server started ahead of time and is running
within its request, with exactly the tenant's options, no data, and a password of its own (the
pool's stops working); no server is handed out twice; one that dies is replaced, never healed; a
create the pool cannot serve takes the cold path."""

import os
import signal
import threading

import pymysql
import pytest
import redis

from provisioning import health, services
from provisioning.backends.local import processes_under
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance, InstanceEvent
from provisioning.reconciler import Reconciler
from provisioning.services import pool

from .conftest import client_for, instance_dir
from .test_changes import cgroup_limit, mysql_client, redis_client
from .test_reconcile_pass import delete_what_each_test_made  # noqa: F401 - autouse: no instance outlives its test

pytestmark = pytest.mark.django_db(transaction=True)
MiB = 1024 * 1024


@pytest.fixture
def warm(settings):
    """fill(mysql=N, redis=N): the pool's sizes, filled now (tasks run inline); emptied at the end."""

    def fill(*, mysql: int = 0, redis: int = 0) -> list[Instance]:
        settings.STOCKROOM_POOL = {"mysql": mysql, "redis": redis}
        services.fill_pool()
        return list(Instance.objects.filter(pool=True, status="running").order_by("pk"))

    yield fill
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 0}
    services.fill_pool()
    assert not Instance.objects.filter(pool=True).live().exists(), "the emptied pool left servers behind"


def create(api, kind: str, body: dict, wait: float = 10):
    return api.post(f"/api/storage/{kind}/instances?wait={wait:g}", body, format="json")


def ready(kind: str) -> list[int]:
    return list(Instance.objects.filter(pool=True, kind=kind, status="running").values_list("pk", flat=True))


def test_a_pooled_redis_create_runs_within_its_request_with_the_tenants_options_and_nothing_else(api, warm):
    [server] = warm(redis=1)
    bootstrap = server.password

    response = create(api, "redis", {"maxmemory": "128mb", "timeout": 300, "notify_keyspace_events": "Ex"})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] == server.pk and body["status"] == "running"
    assert "pool" in body["timings"]
    config = body["config"]
    assert config["password"] != bootstrap and config["port"] == server.port
    client = redis_client(config)
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * MiB)}
    assert client.config_get("timeout") == {"timeout": "300"}
    assert set(client.config_get("notify-keyspace-events")["notify-keyspace-events"]) == set("Ex")
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}, "a default was not kept"
    instance = Instance.objects.get(pk=server.pk)
    assert instance.owner.username == "alice" and not instance.pool
    if (limit := cgroup_limit("redis", server.pk)) is not None:
        assert limit == instance.memory_limit
    # Nothing was in it, and its history says where it came from.
    assert client.dbsize() == 0 and client.keys("*") == []
    reasons = [event.reason for event in InstanceEvent.objects.filter(instance=instance)]
    assert reasons[0] == "Requested by stockroom-pool for the warm pool."
    assert "Requested by alice; taken from the warm pool." in reasons
    assert reasons[-1] == "Taken from the warm pool; a login with the user's credentials succeeded."
    # The pool's own password no longer opens it.
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=config["host"], port=config["port"], password=bootstrap, retry=NO_RETRY).ping()
    assert client.set("mine", "1") and client.get("mine") == b"1"
    # The pool was refilled with a fresh server, not this one.
    assert len(ready("redis")) == 1 and ready("redis") != [server.pk]


def test_a_pooled_mysql_create_has_exactly_the_tenants_options_no_data_and_refuses_the_pools_password(api, warm):
    [server] = warm(mysql=1)
    bootstrap = server.password
    wanted = {"max_connections": 40, "wait_timeout": 600, "innodb_buffer_pool_size": "32mb", "sql_mode": "ANSI_QUOTES"}

    response = create(api, "mysql", wanted)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] == server.pk and "pool" in body["timings"]
    config = body["config"]
    with mysql_client(config) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT @@GLOBAL.max_connections, @@GLOBAL.wait_timeout, @@GLOBAL.innodb_buffer_pool_size, "
            "@@GLOBAL.sql_mode, @@GLOBAL.character_set_server"
        )
        assert cursor.fetchone() == (40, 600, 32 * MiB, "ANSI_QUOTES", "utf8mb4")
        cursor.execute("SHOW TABLES")
        assert cursor.fetchall() == ()
        cursor.execute('CREATE TABLE "t" (id INT PRIMARY KEY)')
        cursor.execute('INSERT INTO "t" VALUES (7)')
        connection.commit()
        cursor.execute('SELECT id FROM "t"')
        assert cursor.fetchall() == ((7,),)
    if (limit := cgroup_limit("mysql", server.pk)) is not None:
        assert limit == Instance.objects.get(pk=server.pk).memory_limit
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=config["host"], port=config["port"], user=config["username"], password=bootstrap)
    assert refused.value.args[0] == 1045  # access denied


def test_an_option_that_needs_a_restart_or_a_clone_takes_the_cold_path(api, warm):
    [server] = warm(redis=1)

    response = create(api, "redis", {"databases": 4})

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] != server.pk and "pool" not in body["timings"]
    assert redis_client(body["config"]).config_get("databases") == {"databases": "4"}
    assert ready("redis") == [server.pk], "the pool server must stay in the pool"


def test_an_empty_pool_takes_the_cold_path_and_is_refilled(api, warm, settings):
    warm(redis=0)
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}  # wanted, not yet started

    response = create(api, "redis", {})

    assert response.status_code == 201, response.content
    assert "pool" not in response.json()["timings"]
    assert len(ready("redis")) == 1


def test_two_creates_at_once_never_get_the_same_pool_server(alice, django_user_model, warm):
    servers = warm(redis=2)
    bob = django_user_model.objects.create_user("bob", password="bob-staple-battery-9")
    answers: dict[str, dict] = {}

    def create_as(user) -> None:
        answers[user.username] = create(client_for(user), "redis", {}).json()

    threads = [threading.Thread(target=create_as, args=(user,)) for user in (alice, bob)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert answers["alice"]["id"] != answers["bob"]["id"]
    # Both came from the pool, each its own server of the two that were ready.
    assert {answers["alice"]["id"], answers["bob"]["id"]} == {server.pk for server in servers}
    assert all("pool" in answer["timings"] for answer in answers.values())
    for name, answer in answers.items():
        assert answer["status"] == "running", answer
        client = redis_client(answer["config"])
        client.set("owner", name)
        assert client.get("owner") == name.encode()
    # Each wrote to its own server: neither sees the other's key.
    assert redis_client(answers["alice"]["config"]).get("owner") == b"alice"
    Instance.objects.filter(owner__username="bob").update(owner=alice)  # the cleanup deletes as alice


def test_a_pool_server_that_dies_is_replaced_not_healed(warm):
    [server] = warm(redis=1)
    for pid in processes_under(instance_dir("redis", server.pk)):
        os.kill(pid, signal.SIGKILL)

    outcome = Reconciler().run_once()

    assert outcome.pool_discarded == [server.pk]
    assert Instance.objects.get(pk=server.pk).status == "deleted"
    assert not instance_dir("redis", server.pk).exists()
    [fresh] = ready("redis")
    assert fresh != server.pk
    replacement = Instance.objects.get(pk=fresh)
    assert services.pool.USERNAME == replacement.owner.username
    redis.Redis(host=replacement.host, port=replacement.port, password=replacement.password, retry=NO_RETRY).ping()


def test_pool_servers_are_nobodys_to_see_and_appear_in_the_pool_summary(api, warm, settings):
    [server] = warm(redis=1)

    assert api.get(f"/api/storage/redis/instances/{server.pk}").status_code == 404
    assert server.pk not in [row["id"] for row in api.get("/api/storage/redis/instances").json()["results"]]
    assert pool.summary()["redis"] == {"ready": 1, "starting": 0, "wanted": 1}
    assert health.pool() == "redis 1 of 1 ready."
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 2}
    assert health.pool() == "Degraded: creates take the cold path until it is full: redis 1 of 2 ready."
