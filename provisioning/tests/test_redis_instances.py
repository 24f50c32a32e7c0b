"""Redis end to end on the local backend: API → real redis-server → real logins → delete."""

import os

import pytest
import redis

from provisioning.backends.local import processes_under
from provisioning.engines.redis import NO_RETRY

from .conftest import instance_dir, port_refuses, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def connect(config: dict, **overrides) -> redis.Redis:
    arguments = {"host": config["host"], "port": config["port"], "password": config["password"], "retry": NO_RETRY}
    return redis.Redis(**(arguments | overrides))


def test_a_redis_instance_from_request_to_deletion(api):
    body = {"maxmemory": "256mb", "maxmemory_policy": "allkeys-lru", "maxclients": 50, "appendfsync": "always"}
    response = api.post("/api/storage/redis/instances", body)
    assert response.status_code == 202
    pk = response.json()["id"]
    instance = wait_for_status(api, "redis", pk, "running", "failed")
    assert instance["status"] == "running", instance["status_message"]

    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    assert config["maxmemory"] == 256 * 1024 * 1024
    client = connect(config)
    assert client.config_get("maxmemory") == {"maxmemory": str(256 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    assert client.config_get("maxclients") == {"maxclients": "50"}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    assert connect(config, username="default").ping()
    client.close()

    servers = processes_under(instance_dir("redis", pk))
    assert len(servers) == 1
    if os.geteuid() == 0:
        assert os.stat(f"/proc/{servers[0]}").st_uid != 0, "instance servers must not run as root"

    response = api.delete(f"/api/storage/redis/instances/{pk}")
    assert response.status_code == 202
    wait_for_status(api, "redis", pk, "gone")
    assert port_refuses(config["port"])
    assert not instance_dir("redis", pk).exists()


def test_the_user_cannot_administer_the_server(api):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert wait_for_status(api, "redis", pk, "running", "failed")["status"] == "running"
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()

    with pytest.raises(redis.AuthenticationError):
        connect(config, password="not-the-password").ping()
    with pytest.raises(redis.AuthenticationError):
        connect(config, password=None).set("k", "v")

    client = connect(config)
    for command in (("CONFIG", "SET", "maxmemory", "0"), ("SHUTDOWN",), ("ACL", "LIST"), ("BGSAVE",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert client.ping()
    client.close()

    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")
