"""The Docker backend against a real dockerd (started by scripts/ensure-docker for make test).

Containers use host networking, so servers listen on 127.0.0.1 and all traffic stays on loopback.
The image is built locally from Debian packages and follows the official images' contract.
"""

import os
import signal
import time

import pymysql
import pytest
import redis
from django.core.management import call_command

from provisioning.backends.base import get_backend
from provisioning.backends.docker import LABEL
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance

from .conftest import port_refuses, wait_for_status

IMAGE = os.environ.get("STOCKROOM_TEST_DOCKER_IMAGE", "")
DOCKER_URL = os.environ.get("STOCKROOM_TEST_DOCKER_URL", "")

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def docker_settings(settings):
    if not IMAGE:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Docker tests: scripts/ensure-docker did not provide an image.")
        pytest.skip("no Docker engine or test image (make test prepares them)")

    def configure(**changes):
        options = {
            "base_url": DOCKER_URL,
            "volume_root": str(settings.DATA_DIR / "docker"),
            "host_ip": "127.0.0.1",
            "images": {"mysql": IMAGE, "redis": IMAGE},
            "network_mode": "host",
            "portal_id": "stockroom-tests",
        } | changes
        settings.STOCKROOM_BACKENDS = {
            **settings.STOCKROOM_BACKENDS,
            "docker": {"BACKEND": "provisioning.backends.docker.DockerBackend", "OPTIONS": options},
        }
        settings.STOCKROOM_DEFAULT_BACKEND = "docker"
        return get_backend("docker")

    return configure


def container_of(backend, pk: int):
    found = backend.client.containers.list(all=True, filters={"label": f"{LABEL}.instance={pk}"})
    return found[0] if found else None


def kill_main_process_and_wait_for_restart(container) -> None:
    container.reload()
    restarts = container.attrs["RestartCount"]
    os.kill(container.attrs["State"]["Pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        container.reload()
        if container.attrs["RestartCount"] > restarts and container.status == "running":
            return
        assert time.monotonic() < deadline, "Docker did not restart the container"
        time.sleep(0.2)


def retry(action, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_mysql_container_from_request_to_deletion(api, docker_settings):
    backend = docker_settings()
    pk = api.post("/api/storage/mysql/instances", {"charset": "latin1", "binlog_format": "STATEMENT"}).json()["id"]
    instance = wait_for_status(api, "mysql", pk, "running", "failed", timeout=120)
    assert instance["status"] == "running", instance["status_message"]
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()

    def connect():
        return pymysql.connect(
            host=config["host"],
            port=config["port"],
            user=config["username"],
            password=config["password"],
            database=config["database"],
        )

    with connect() as db, db.cursor() as cursor:
        cursor.execute("SELECT @@character_set_server, @@binlog_format, @@log_bin, CURRENT_USER()")
        assert cursor.fetchone() == ("latin1", "STATEMENT", 1, "app@%")
        cursor.execute("CREATE TABLE kept (v INT) ENGINE=InnoDB")
        cursor.execute("INSERT INTO kept VALUES (42)")
        db.commit()
        with pytest.raises(pymysql.err.OperationalError):
            cursor.execute("CREATE DATABASE other")

    container = container_of(backend, pk)
    assert container.name == f"stockroom-mysql-{pk}"
    assert container.labels[f"{LABEL}.kind"] == "mysql"
    assert container.labels[f"{LABEL}.portal"] == "stockroom-tests"
    assert container.attrs["HostConfig"]["Memory"] == 512 * 1024 * 1024
    assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    mounts = {mount["Destination"]: mount for mount in container.attrs["Mounts"]}
    assert mounts["/etc/mysql/conf.d/stockroom.cnf"]["RW"] is False

    kill_main_process_and_wait_for_restart(container)

    def committed_row():
        with connect() as db, db.cursor() as cursor:
            cursor.execute("SELECT v FROM kept")
            return cursor.fetchone()

    assert retry(committed_row) == (42,)

    assert api.delete(f"/api/storage/mysql/instances/{pk}").status_code == 202
    wait_for_status(api, "mysql", pk, "gone", timeout=60)
    assert container_of(backend, pk) is None
    assert not (backend.volume_root / "mysql" / str(pk)).exists()
    assert port_refuses(config["port"])


def test_a_redis_container_keeps_its_data_when_docker_restarts_it(api, docker_settings):
    backend = docker_settings()
    body = {"maxmemory": "128mb", "maxclients": 64, "appendfsync": "always"}
    pk = api.post("/api/storage/redis/instances", body).json()["id"]
    instance = wait_for_status(api, "redis", pk, "running", "failed", timeout=120)
    assert instance["status"] == "running", instance["status_message"]
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
    assert client.config_get("maxclients") == {"maxclients": "64"}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    client.set("durable", "yes")

    container = container_of(backend, pk)
    assert container.attrs["HostConfig"]["Memory"] == 128 * 1024 * 1024 * 3 // 2 + 64 * 1024 * 1024
    acl = (backend.volume_root / "redis" / str(pk) / "users.acl").read_text()
    assert config["password"] not in acl and "#" in acl

    kill_main_process_and_wait_for_restart(container)
    assert retry(lambda: redis.Redis(
        host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY
    ).get("durable")) == b"yes"  # fmt: skip

    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202
    wait_for_status(api, "redis", pk, "gone", timeout=60)
    assert container_of(backend, pk) is None
    assert port_refuses(config["port"])


def test_an_image_that_cannot_be_pulled_fails_cleanly(api, docker_settings):
    backend = docker_settings(images={"mysql": "stockroom/no-such-image:1", "redis": IMAGE})
    pk = api.post("/api/storage/mysql/instances", {}).json()["id"]
    instance = wait_for_status(api, "mysql", pk, "failed", "running", timeout=120)
    assert instance["status"] == "failed"
    assert "stockroom/no-such-image:1" in instance["status_message"]
    assert container_of(backend, pk) is None
    assert not (backend.volume_root / "mysql" / str(pk)).exists()


def test_a_stopped_daemon_fails_cleanly(api, docker_settings, tmp_path):
    backend = docker_settings(base_url=f"unix://{tmp_path}/no-docker.sock")
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    instance = wait_for_status(api, "redis", pk, "failed", "running")
    assert instance["status"] == "failed"
    assert "Docker daemon" in instance["status_message"] and "not reachable" in instance["status_message"]
    assert not (backend.volume_root / "redis" / str(pk)).exists()
    assert not Instance.objects.live().exists()


def test_healthz_says_whether_the_daemon_answers(client, docker_settings, tmp_path):
    docker_settings()
    assert client.get("/healthz").json()["checks"]["backends"]["detail"].startswith("docker: Docker ")
    docker_settings(base_url=f"unix://{tmp_path}/no-docker.sock")
    response = client.get("/healthz")
    assert response.status_code == 503
    backends = response.json()["checks"]["backends"]
    assert not backends["ok"]
    assert (
        backends["detail"]
        == f"docker: The Docker daemon at unix://{tmp_path}/no-docker.sock is not reachable (could not connect)."
    )


def test_containers_unknown_to_the_portal_are_reported_and_removable(docker_settings, capsys):
    backend = docker_settings()
    stray = backend.client.containers.create(
        IMAGE,
        ["sleep", "60"],
        name="stockroom-redis-999999",
        labels={
            f"{LABEL}.managed": "true",
            f"{LABEL}.portal": "stockroom-tests",
            f"{LABEL}.instance": "999999",
            f"{LABEL}.kind": "redis",
        },
    )
    foreign = backend.client.containers.create(IMAGE, ["sleep", "60"], labels={f"{LABEL}.managed": "true"})
    try:
        call_command("orphans", "--backend", "docker")
        assert "stockroom-redis-999999" in capsys.readouterr().out
        call_command("orphans", "--backend", "docker", "--remove")
        assert "Removed 1 orphan(s)." in capsys.readouterr().out
        assert container_of(backend, 999999) is None
        foreign.reload()  # another portal's container is left alone
    finally:
        foreign.remove(force=True)
        if container_of(backend, 999999):
            stray.remove(force=True)


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_lifecycle_actions_on_containers(api, docker_settings, kind):
    from .test_lifecycle import act, running

    docker_settings()
    pk, config = running(api, kind)
    assert act(api, kind, pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    assert port_refuses(config["port"])
    assert act(api, kind, pk, "start", "running", "stopped")["status"] == "running"
    assert act(api, kind, pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    new = api.get(f"/api/storage/{kind}/instances/{pk}/config").json()
    assert new["password"] != config["password"]
    if kind == "mysql":
        from .test_lifecycle import mysql

        mysql(new).close()
        with pytest.raises(pymysql.err.OperationalError):
            mysql(config)
    else:
        assert redis.Redis(host=new["host"], port=new["port"], password=new["password"], retry=NO_RETRY).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY).ping()
    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=60)
