"""The Docker backend against a real dockerd (started by scripts/ensure-docker for make test).

Containers use host networking, so servers listen on 127.0.0.1 and all traffic stays on loopback.
The image is built locally from Debian packages and follows the official images' contract.
"""

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import docker.errors
import pymysql
import pytest
import redis
from django.core.management import call_command

from provisioning import services
from provisioning.backends.base import BackendError, get_backend
from provisioning.backends.docker import LABEL
from provisioning.engines import get_engine
from provisioning.engines.mysql import native_password_hash
from provisioning.engines.redis import ADMIN_USERNAME, NO_RETRY, acl_password_hash
from provisioning.models import Instance, LogFile

from .conftest import connects_as, port_refuses, wait_for_status
from .test_confinement_local import DISKS, WRITES, mounts, set_disk_limit, with_disk
from .test_imports import foreign_dump, foreign_rdb, imports_and_reads_back  # noqa: F401 - fixtures
from .test_lifecycle import act, mysql, running
from .test_point_in_time import KINDS, Writes, iso, restore_to
from .test_snapshots import config_of, create, execute, redis_client, restore, rows, snapshot_of, stored

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

    yield configure
    # A test that failed half way leaves its containers behind; the next tests must not meet them.
    backend = configure()
    for container in backend.orphans(known_ids=set()):
        backend.remove_orphan(container)
    backend.forget_ready()


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


def test_a_portal_that_is_not_root_fails_cleanly(api, docker_settings, monkeypatch):
    backend = docker_settings()
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    instance = wait_for_status(api, "redis", pk, "failed", "running")
    assert instance["status"] == "failed"
    assert "must run as root" in instance["status_message"]
    assert container_of(backend, pk) is None
    assert not (backend.volume_root / "redis" / str(pk)).exists()


def test_healthz_says_whether_the_daemon_answers(admin_client, docker_settings, tmp_path):
    docker_settings()
    assert admin_client.get("/healthz").json()["checks"]["backends"]["detail"].startswith("docker: Docker ")
    docker_settings(base_url=f"unix://{tmp_path}/no-docker.sock")
    response = admin_client.get("/healthz")
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
    docker_settings()
    pk, config = running(api, kind)
    assert act(api, kind, pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    assert port_refuses(config["port"])
    assert act(api, kind, pk, "start", "running", "stopped")["status"] == "running"
    assert act(api, kind, pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    new = api.get(f"/api/storage/{kind}/instances/{pk}/config").json()
    assert new["password"] != config["password"]
    if kind == "mysql":
        mysql(new).close()
        with pytest.raises(pymysql.err.OperationalError):
            mysql(config)
    else:
        assert redis.Redis(host=new["host"], port=new["port"], password=new["password"], retry=NO_RETRY).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY).ping()
    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=60)


# Confinement: what a container may see and do, and what anyone else may see of it ----------


def files_holding(directory: Path, secrets: list[str]) -> list[str]:
    """Files under `directory` (data included) that hold one of `secrets` in plain text."""
    found = []
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            found += [f"{path} holds secret #{n}" for n, secret in enumerate(secrets) if secret.encode() in content]
    return found


def hashes(passwords: list[str]) -> list[str]:
    """The forms in which the engines store `passwords`."""
    return [native_password_hash(p) for p in passwords] + [acl_password_hash(p)[1:] for p in passwords]


def kernel_limit(pid: int, controller: str, v1_file: str, v2_file: str) -> int:
    """A limit the kernel holds for the cgroup of process `pid`, on cgroup v1 or v2."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/{controller}{path}/{v1_file}").read_text())
        if controllers == "" and Path(f"/sys/fs/cgroup{path}/{v2_file}").exists():
            return int(Path(f"/sys/fs/cgroup{path}/{v2_file}").read_text())
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_no_password_reaches_a_container_but_through_files_emptied_after_the_first_start(api, docker_settings, kind):
    backend = docker_settings()
    pk, config = running(api, kind)
    instance = Instance.objects.get(pk=pk)
    secrets = [instance.password, instance.admin_password]
    container = container_of(backend, pk)

    # Nothing docker inspect shows (Env, Cmd, Args, Labels, Mounts…) holds a password or its hash,
    # nor does the container's log.
    inspected = json.dumps(container.attrs)
    assert [s for s in secrets + hashes(secrets) if s in inspected] == []
    assert not [v for v in container.attrs["Config"]["Env"] if "PASSWORD=" in v]
    log = container.logs()
    assert [s for s in secrets if s.encode() in log] == []

    # No file the portal or the server wrote holds a password in plain text, and the first-start
    # files (the hashes of the accounts) are empty now.
    directory = backend.volume_root / kind / str(pk)
    assert files_holding(directory, secrets) == []
    if kind == "mysql":
        first_start = sorted((directory / "init").iterdir())
        assert [(f.name, f.stat().st_size) for f in first_start] == [("init.sql", 0), ("root-password-hash", 0)]

    # A rotation writes no plaintext either, and leaves nothing stale in the container's settings.
    assert act(api, kind, pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    instance.refresh_from_db()
    assert instance.password not in secrets
    assert files_holding(directory, [instance.password]) == []
    container.reload()
    assert [s for s in [instance.password, *hashes([instance.password])] if s in json.dumps(container.attrs)] == []

    # The container survives a restart with its first-start files empty.
    kill_main_process_and_wait_for_restart(container)
    assert retry(lambda: backend.probe(instance)) is None
    assert act(api, kind, pk, "restart", "running", "unhealthy")["status"] == "running"
    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=60)


def test_the_portal_administers_mysql_over_a_socket_only_root_reaches_and_root_has_no_remote_account(
    api, docker_settings
):
    backend = docker_settings()
    pk, config = running(api, "mysql")
    instance = Instance.objects.get(pk=pk)
    directory, uid = backend.volume_root / "mysql" / str(pk), backend.uid(instance)

    # root may log in over the socket only: as root@'%' over TCP it is refused.
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(host=config["host"], port=config["port"], user="root", password=instance.admin_password)
    assert refused.value.args[0] == 1045  # "Access denied for user 'root'@'127.0.0.1'"
    socket_path = backend.socket(instance)
    assert socket_path == directory / "run" / "mysqld.sock"
    with pymysql.connect(unix_socket=str(socket_path), user="root", password=instance.admin_password) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT User, Host FROM mysql.global_priv")
            accounts = set(cursor.fetchall())
    assert accounts == {("root", "localhost"), ("mariadb.sys", "localhost"), ("app", "%")}

    # The socket lies in a folder only root may enter; the server's own uid owns the one below.
    assert (directory.stat().st_uid, directory.stat().st_mode & 0o777) == (0, 0o700)
    run = (directory / "run").stat()
    assert (run.st_uid, run.st_mode & 0o777) == (uid, 0o700)
    assert connects_as(65534, socket_path) == "PermissionError"
    assert connects_as(0, socket_path) == "connected"

    # A rotation goes through it.
    assert act(api, "mysql", pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    new = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    mysql(new).close()
    with pytest.raises(pymysql.err.OperationalError):
        mysql(config)
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone", timeout=60)


def test_the_portal_administers_redis_over_a_socket_only_root_reaches(api, docker_settings):
    backend = docker_settings()
    pk, config = running(api, "redis")
    instance = Instance.objects.get(pk=pk)
    directory = backend.volume_root / "redis" / str(pk)
    socket_path = backend.socket(instance)
    assert socket_path == directory / "run" / "redis.sock"
    admin = redis.Redis(
        unix_socket_path=str(socket_path), username=ADMIN_USERNAME, password=instance.admin_password, retry=NO_RETRY
    )
    assert admin.acl_whoami() == ADMIN_USERNAME
    admin.close()
    assert (directory.stat().st_uid, directory.stat().st_mode & 0o777) == (0, 0o700)
    assert connects_as(65534, socket_path) == "PermissionError"
    assert connects_as(0, socket_path) == "connected"

    assert act(api, "redis", pk, "rotate-password", "running", "unhealthy")["status"] == "running"
    new = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    assert redis.Redis(host=new["host"], port=new["port"], password=new["password"], retry=NO_RETRY).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY).ping()
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone", timeout=60)


def test_the_portal_follows_no_symlink_the_containers_uid_puts_in_place_of_its_socket(api, docker_settings, tmp_path):
    """The `run` folder is the container uid's: it may swap the socket for a symlink to a listener
    of its choosing. The portal's administrative login must not go there."""
    backend = docker_settings()
    pk, _config = running(api, "redis")
    instance = Instance.objects.get(pk=pk)
    socket_path = backend.socket(instance)
    decoy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    decoy.bind(str(tmp_path / "decoy.sock"))
    decoy.listen()
    decoy.setblocking(False)
    os.rename(socket_path, socket_path.with_name("moved.sock"))
    os.symlink(tmp_path / "decoy.sock", socket_path)
    os.lchown(socket_path, backend.uid(instance), backend.uid(instance))

    with pytest.raises(BackendError, match="is not the server's socket"):
        backend.set_password(instance, "not-sent-anywhere")
    with pytest.raises(BlockingIOError):
        decoy.accept()  # nobody connected
    decoy.close()
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone", timeout=60)


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_containers_run_as_their_own_uid_without_privileges_within_kernel_limits(api, docker_settings, kind):
    backend = docker_settings()
    engine = get_engine(kind)
    pk, config = running(api, kind)
    instance = Instance.objects.get(pk=pk)
    uid = backend.uid(instance)
    container = container_of(backend, pk)
    host_config = container.attrs["HostConfig"]
    assert container.attrs["Config"]["User"] == f"{uid}:{uid}"
    assert host_config["CapDrop"] == ["ALL"] and not host_config["CapAdd"]
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["PidsLimit"] == engine.pids_limit
    assert host_config["Memory"] == engine.memory_limit(instance.options)

    # The server as the kernel sees it: the instance's uid, no capability, none to gain.
    pid = container.attrs["State"]["Pid"]
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split() == [str(uid)] * 4 and status["Gid"].split() == [str(uid)] * 4
    assert {status[name] for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")} == {"0000000000000000"}
    assert status["NoNewPrivs"] == "1"
    assert kernel_limit(pid, "pids", "pids.max", "pids.max") == engine.pids_limit
    assert kernel_limit(pid, "memory", "memory.limit_in_bytes", "memory.max") == engine.memory_limit(instance.options)

    # The server's uid can write nowhere but its own folders, and cannot start more tasks than the limit.
    code, output = container.exec_run(["sh", "-c", "touch /etc/planted || touch /planted"])
    assert code != 0 and b"Read-only file system" in output
    code, output = container.exec_run(
        ["sh", "-c", 'i=0; while [ $i -lt 1000 ]; do sleep 3 & i=$((i + 1)); echo "$i"; done']
    )
    started = int(re.findall(rb"^(\d+)$", output, re.MULTILINE)[-1])
    assert code != 0 and b"fork" in output.lower() and started < engine.pids_limit
    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=60)


def test_a_mysql_container_that_loses_its_data_does_not_come_back_with_an_open_root(api, docker_settings):
    backend = docker_settings()
    pk, config = running(api, "mysql")
    assert act(api, "mysql", pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    data = backend.volume_root / "mysql" / str(pk) / "disk" / "data"
    for path in data.iterdir():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    container = container_of(backend, pk)
    container.start()
    deadline = time.monotonic() + 60
    while b"password option is not specified" not in container.logs():
        assert time.monotonic() < deadline, container.logs(tail=5)
        time.sleep(0.2)
    assert not (data / "mysql").exists()
    assert port_refuses(config["port"])
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone", timeout=60)


def test_the_test_image_runs_the_versions_of_the_default_images(docker_settings):
    backend = docker_settings()
    for kind, command in (("mysql", ["mariadbd", "--version"]), ("redis", ["redis-server", "--version"])):
        version = get_engine(kind).image.partition(":")[2]  # mariadb:10.11 -> 10.11
        output = backend.client.containers.run(IMAGE, command, entrypoint=[], remove=True).decode()
        assert re.search(rf"(Ver |v=){re.escape(version)}\.\d", output), output


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_container_writes_no_more_than_its_disk_limit_and_the_status_says_so(api, docker_settings, settings, kind):
    from provisioning.reconciler import Reconciler

    backend = docker_settings()
    assert backend.no_disks is None, backend.no_disks
    size, row, fill, count = DISKS[kind]
    pk, config = running(api, kind, with_disk(settings, kind, size))
    directory = backend.volume_root / kind / str(pk)
    fstype, options = mounts()[str(directory / "disk")]
    assert fstype == "ext4" and {"nosuid", "nodev", "noexec"} <= options
    assert (directory / "disk.img").stat().st_size == size

    taken = fill(config)
    assert size / 4 < taken * row < 2 * size
    Reconciler().run_once()
    body = api.get(f"/api/storage/{kind}/instances/{pk}").json()
    assert body["status"] == "running"
    assert body["status_message"].startswith("Its disk is full (") and "writes fail" in body["status_message"]
    assert count(config) == taken, "reads still work"

    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=60)
    assert str(directory / "disk") not in mounts() and not directory.exists()


def test_without_loop_mounts_the_reconciler_makes_a_container_over_its_disk_limit_refuse_writes(
    api, docker_settings, settings, monkeypatch
):
    from provisioning.backends.disks import MiB, bytes_under
    from provisioning.reconciler import Reconciler

    backend = docker_settings()
    monkeypatch.setattr(backend, "no_disks", "loop mounts are switched off in this test")
    assert "The reconciler enforces disk limits, not the kernel" in backend.check()
    write, read, refused = WRITES["redis"]
    pk, config = running(api, "redis")
    disk = backend.volume_root / "redis" / str(pk) / "disk"
    assert str(disk) not in mounts()
    write(config, 1)
    set_disk_limit(settings, pk, bytes_under(disk) + 4 * MiB)

    write(config, 8)  # past the limit: nothing stops it yet
    Reconciler().run_once()
    body = api.get(f"/api/storage/redis/instances/{pk}").json()
    assert body["status"] == "running" and "refuses writes" in body["status_message"]
    with pytest.raises(refused, match="NOREPLICAS"):
        write(config, 1)
    assert read(config) == 9, "reads still work"

    set_disk_limit(settings, pk, 1024 * MiB)  # as a larger disk would
    Reconciler().run_once()
    assert api.get(f"/api/storage/redis/instances/{pk}").json()["status_message"] == "Running; its disk has room again."
    write(config, 1)
    assert read(config) == 10
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone", timeout=60)


def test_a_container_started_before_its_disk_is_mounted_stays_down_until_the_portal_mounts_it(
    api, docker_settings, settings
):
    """As after the host restarts: Docker starts its containers (restart policy) before the
    portal has mounted their disks. The server must not write its data outside its limit."""
    backend = docker_settings()
    pk, config = running(api, "redis")
    redis.Redis.from_url(config["uri"], retry=NO_RETRY).set("kept", "yes")
    assert act(api, "redis", pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    disk = backend.volume_root / "redis" / str(pk) / "disk"
    backend.disks.unmount(disk)
    assert not any(disk.iterdir())

    container = container_of(backend, pk)
    with pytest.raises(Exception, match="disk/data"):
        container.start()
    assert not any(disk.iterdir()), "nothing was written outside the disk"

    assert act(api, "redis", pk, "start", "running", "failed")["status"] == "running"
    assert os.path.ismount(disk)
    assert redis.Redis.from_url(config["uri"], retry=NO_RETRY).get("kept") == b"yes"
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone", timeout=60)


# Snapshots, restores and clones of containers ----------------------------------------------------


def write_seed(kind: str, config: dict) -> None:
    if kind == "mysql":
        execute(
            config,
            "CREATE TABLE t (id INT PRIMARY KEY, note TEXT) ENGINE=InnoDB",
            "INSERT INTO t VALUES (1, 'one'), (2, 'two')",
            "CREATE TABLE a (id INT PRIMARY KEY) ENGINE=Aria",
            "INSERT INTO a VALUES (10)",
        )
    else:
        client = redis_client(config)
        client.set("a", "1")
        client.hset("h", mapping={"x": "y"})
        client.rpush("l", "1", "2", "3")


def write_more(kind: str, config: dict) -> None:
    if kind == "mysql":
        execute(
            config, "INSERT INTO t VALUES (3, 'three')", "UPDATE t SET note = 'changed' WHERE id = 1", "DROP TABLE a"
        )
    else:
        client = redis_client(config)
        client.set("b", "2")
        client.delete("a")
        client.rpush("l", "4")


def holds_the_seed(kind: str, config: dict) -> bool:
    if kind == "mysql":
        return rows(config) == [[1, "one"], [2, "two"]] and rows(config, "a") == [[10]]
    client = redis_client(config)
    return sorted(client.keys()) == ["a", "h", "l"] and client.lrange("l", 0, -1) == ["1", "2", "3"]


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_container_restores_exactly_its_snapshot_and_a_clone_of_it_is_independent(api, docker_settings, kind):
    backend = docker_settings()
    source = create(api, kind)
    pk, config = source["id"], config_of(api, kind, source["id"])
    instance = Instance.objects.get(pk=pk)
    write_seed(kind, config)
    snapshot = snapshot_of(api, kind, pk)
    content = stored(snapshot).read_bytes()
    assert snapshot["checksum"] == "sha256:" + hashlib.sha256(content).hexdigest()
    for secret in (config["password"], instance.admin_password):
        assert secret.encode() not in content
    # Taken in the container, by the image's own programs: no other container, and (MySQL) the backup
    # account's option file is gone from the container's memory.
    container = container_of(backend, pk)
    assert [c.name for c in backend.client.containers.list(all=True)] == [container.name]
    assert container.exec_run(["ls", "-A", "/dev/shm"], user="0") == (0, b"")

    write_more(kind, config)
    restored = restore(api, kind, pk, snapshot["id"])
    assert restored["status"] == "running", restored["status_message"]
    assert config_of(api, kind, pk)["password"] == config["password"]
    assert holds_the_seed(kind, config)
    # The helper container is gone, and `disk/` is root's alone again.
    assert [c.name for c in backend.client.containers.list(all=True)] == [f"stockroom-{kind}-{pk}"]
    disk = backend.directory(instance) / "disk"
    assert (disk.stat().st_uid, disk.stat().st_gid, stat.S_IMODE(disk.stat().st_mode)) == (0, 0, 0o700)
    if kind == "mysql":
        # Only the portal's root and the user's account, and the first-start files are empty again.
        socket_path = str(backend.socket(instance))
        with pymysql.connect(unix_socket=socket_path, user="root", password=instance.admin_password) as db:
            with db.cursor() as cursor:
                cursor.execute("SELECT User, Host FROM mysql.global_priv ORDER BY User")
                assert cursor.fetchall() == (("app", "%"), ("mariadb.sys", "localhost"), ("root", "localhost"))
        init = backend.directory(instance) / "init"
        assert {path.name: path.read_text() for path in init.iterdir()} == {"init.sql": "", "root-password-hash": ""}
        assert "init-file" not in (backend.directory(instance) / "my.cnf").read_text()

    clone = create(api, kind, name="clone", from_snapshot=snapshot["id"])
    clone_config = config_of(api, kind, clone["id"])
    assert clone_config["password"] != config["password"]
    assert holds_the_seed(kind, clone_config)
    if kind == "mysql":
        execute(clone_config, "INSERT INTO t VALUES (9, 'clone only')")
        assert rows(config) == [[1, "one"], [2, "two"]]
        with pytest.raises(pymysql.err.OperationalError):
            mysql({**clone_config, "password": config["password"]})
    else:
        redis_client(clone_config).set("clone-only", "1")
        assert redis_client(config).get("clone-only") is None
        with pytest.raises(redis.AuthenticationError):
            redis_client({**clone_config, "password": config["password"]}).ping()
    # After a restart the clone still has its own data and accounts.
    assert act(api, kind, clone["id"], "restart", "running", "unhealthy")["status"] == "running"
    if kind == "mysql":
        assert rows(clone_config) == [[1, "one"], [2, "two"], [9, "clone only"]]
    else:
        assert redis_client(clone_config).get("clone-only") == "1"
    for each in (pk, clone["id"]):
        api.delete(f"/api/storage/{kind}/instances/{each}")
        wait_for_status(api, kind, each, "gone", timeout=60)


def test_a_container_snapshot_reads_no_file_of_the_hosts(api, docker_settings, settings):
    """The container's uid plants symlinks in its data to a file of the host's that any user may
    read. Its snapshot runs in its container, where that path leads to nothing: on the host, even
    as the uid, it would have been copied into the snapshot, and the tenant would restore it."""
    backend = docker_settings()
    pk, config = running(api, "mysql")
    instance = Instance.objects.get(pk=pk)
    uid = backend.uid(instance)
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY) ENGINE=Aria", "INSERT INTO t VALUES (1)")
    marker = f"host-only-{secrets.token_hex(8)}".encode()
    host_file = Path("/var/tmp") / marker.decode()
    host_file.write_bytes(marker)
    host_file.chmod(0o644)
    try:
        # Readable by the uid on the host: the attack works against a helper run there.
        read = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat", str(host_file)])
        assert read.returncode == 0
        data = backend.directory(instance) / "disk" / "data" / "app"
        for name in ("stolen.frm", "stolen.MYD", "stolen.MAI"):
            (data / name).symlink_to(host_file)
            os.lchown(data / name, uid, uid)
        response = api.post(f"/api/storage/mysql/instances/{pk}/snapshots")
        snapshot = api.get(f"/api/storage/mysql/snapshots/{response.json()['id']}").json()
        # In the container the links lead nowhere: the snapshot is taken, without the host's file.
        assert snapshot["status"] == "ready", snapshot["status_message"]
        assert marker not in stored(snapshot).read_bytes()
        assert all(
            marker not in path.read_bytes() for path in settings.STOCKROOM_SNAPSHOT_DIR.rglob("*") if path.is_file()
        )
        assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "running"
    finally:
        host_file.unlink()
    # Nor does the portal follow a symlink in place of the data folder when it starts the container
    # again: Docker would mount whatever it points to.
    assert act(api, "mysql", pk, "stop", "stopped", "unhealthy")["status"] == "stopped"
    disk = backend.directory(instance) / "disk"
    (disk / "data").rename(disk / "kept")
    (disk / "data").symlink_to("/etc")
    with pytest.raises(BackendError, match="is not the server's folder"):
        backend.start(instance)
    assert container_of(backend, pk).status == "exited"
    (disk / "data").unlink()
    (disk / "kept").rename(disk / "data")
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone", timeout=60)


def test_a_restore_helper_is_confined_and_a_restore_cut_short_is_undone_by_the_next(api, docker_settings):
    """A restore's helper container runs with no more than the instance's server may have. Then the
    worker died in the middle of a restore: its helper container still runs, `disk/` is still
    open to the uid's group, and the old data was just moved aside. The next restore clears all of
    that first, so even when it fails too, the server starts with its whole old data."""
    backend = docker_settings()
    pk, config = running(api, "mysql")
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'kept')")
    row = Instance.objects.get(pk=pk)
    backend.stop(row)
    disk = backend.directory(row) / "disk"
    # A restore's helper: the instance's uid, image and limits, no privilege, no network, its disk only.
    with backend._helper(row) as helper:
        host_config, uid = helper.attrs["HostConfig"], backend.uid(row)
        assert helper.attrs["Config"]["User"] == f"{uid}:{uid}"
        assert host_config["CapDrop"] == ["ALL"] and not host_config["CapAdd"]
        assert host_config["SecurityOpt"] == ["no-new-privileges"] and host_config["ReadonlyRootfs"] is True
        assert host_config["NetworkMode"] == "none" and host_config["PidsLimit"] == get_engine("mysql").pids_limit
        assert host_config["Memory"] == get_engine("mysql").memory_limit(row.options)
        assert [mount["Source"] for mount in helper.attrs["Mounts"] if mount["Type"] == "bind"] == [str(disk)]
        assert (disk.stat().st_gid, stat.S_IMODE(disk.stat().st_mode)) == (uid, 0o770)  # only meanwhile
    assert (disk.stat().st_uid, disk.stat().st_gid, stat.S_IMODE(disk.stat().st_mode)) == (0, 0, 0o700)
    # What the killed restore left: its helper container, `disk/` open to the uid's group, the data aside.
    backend.client.containers.run(
        IMAGE, ["infinity"], entrypoint=["sleep"], name=f"stockroom-mysql-{pk}-helper", detach=True,
        labels={**backend.labels(row), f"{LABEL}.helper": "true"}, network_mode="none",
    )  # fmt: skip
    os.chown(disk, 0, backend.uid(row))
    disk.chmod(0o770)
    (disk / "data").rename(disk / "data.old")

    with pytest.raises(BackendError, match="mbstream failed"):
        backend.restore(row, io.BytesIO(b"not a snapshot"))
    assert (disk.stat().st_uid, disk.stat().st_gid, stat.S_IMODE(disk.stat().st_mode)) == (0, 0, 0o700)
    assert [c.name for c in backend.client.containers.list(all=True)] == [f"stockroom-mysql-{pk}"]
    backend.start(row)
    assert rows(config) == [[1, "kept"]]
    assert sorted(path.name for path in disk.iterdir()) == ["data", "tmp"]
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone", timeout=60)


# Point-in-time recovery of containers -------------------------------------------------------------


def watch_for_the_replay_server(backend, instance: Instance, seen: dict, done: threading.Event) -> None:
    """Notes, in `seen`, the uid, network namespace and TCP listeners of the instance's MySQL replay
    server (the `mariadbd` without grant tables) and the helper container's namespace, once it runs."""
    uid = backend.uid(instance)
    while not done.is_set() and not seen:
        for entry in Path("/proc").iterdir():
            try:
                if not entry.name.isdigit() or entry.stat().st_uid != uid:
                    continue
                if b"--skip-grant-tables" not in (entry / "cmdline").read_bytes().split(b"\0"):
                    continue
                # What it is, at once: a short replay may be over before a loaded machine looks again.
                found = {"uid": entry.stat().st_uid, "net": os.readlink(entry / "ns" / "net"), "tcp": []}
            except (OSError, ValueError):
                continue
            deadline = time.monotonic() + 0.5  # listening by then, if it ever does
            while time.monotonic() < deadline:
                try:
                    tables = [(entry / "net" / name).read_text().splitlines()[1:] for name in ("tcp", "tcp6")]
                except OSError:  # it has ended
                    break
                found["tcp"] += [line for table in tables for line in table if line.split()[3] == "0A"]
                time.sleep(0.02)
            try:  # the helper container outlives the replay
                helper = backend.client.containers.get(f"{backend.name(instance)}-helper")
                found["helper_net"] = os.readlink(f"/proc/{helper.attrs['State']['Pid']}/ns/net")
            except (OSError, docker.errors.DockerException) as exc:
                found["helper_net"] = f"not read: {exc}"
            seen.update(found)
            return
        time.sleep(0.01)


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_container_restores_and_clones_to_a_time_with_exactly_the_writes_before_it(api, docker_settings, kind):
    """The log is archived from the instance's own container; the replay runs in the restore's helper
    container (MySQL: a private `mariadbd` of the image on the staged copy, before the swap)."""
    backend = docker_settings()
    writer, read, prepare = KINDS[kind]
    instance = create(api, kind)
    pk = instance["id"]
    assert instance["recovery_window"] is None  # no base yet
    config = config_of(api, kind, pk)
    if kind == "redis":  # the container's server time-stamps its writes, and only the portal rewrites
        client = redis_client(config)
        settings = client.config_get("aof-timestamp-enabled") | client.config_get("auto-aof-rewrite-percentage")
        assert settings == {"aof-timestamp-enabled": "yes", "auto-aof-rewrite-percentage": "0"}
    prepare(config)
    snapshot_of(api, kind, pk)
    time.sleep(1)  # the window begins with the whole second after the base was finished
    assert api.get(f"/api/storage/{kind}/instances/{pk}").json()["recovery_window"] is not None

    # A write every 1.2 s for 12 s, the log archived twice meanwhile (as the reconciler does).
    writes = Writes(writer(config))
    writes.run(list(range(1, 11)), archive_after=(3, 7), pk=pk)
    assert LogFile.objects.filter(instance_id=pk).count() >= 2

    response = api.post(
        f"/api/storage/{kind}/instances", {"from_instance": pk, "time": iso(writes.second_after(4))}, format="json"
    )
    assert response.status_code == 202, response.content
    clone = wait_for_status(api, kind, response.json()["id"], "running", "failed", timeout=120)
    assert clone["status"] == "running", clone["status_message"]
    assert read(config_of(api, kind, clone["id"])) == [1, 2, 3, 4]

    row = Instance.objects.get(pk=pk)
    seen: dict = {}
    done = threading.Event()
    watcher = threading.Thread(target=watch_for_the_replay_server, args=(backend, row, seen, done))
    watcher.start()
    try:
        restore_to(api, kind, pk, writes.second_after(5))
    finally:
        done.set()
        watcher.join()
    assert read(config) == [1, 2, 3, 4, 5]
    if kind == "mysql":
        # The replay's server ran in the helper container, as the instance's uid, with no listener.
        assert seen, "the replay server was never seen"
        assert seen["uid"] == backend.uid(row) and seen["net"] == seen["helper_net"]
        assert seen["net"] != os.readlink("/proc/self/ns/net") and seen["tcp"] == []
    # No helper container is left, nor anything of the replay in the instance's disk.
    names = sorted(c.name for c in backend.client.containers.list(all=True))
    assert names == sorted([f"stockroom-{kind}-{pk}", f"stockroom-{kind}-{clone['id']}"])
    disk = backend.directory(row) / "disk"
    left = {"data/appendonlydir.restoring", "data/appendonlydir.old", "data.restoring", "data.old", "tmp/replay"}
    assert not {name for name in left if os.path.lexists(disk / name)}
    for each in (pk, clone["id"]):
        api.delete(f"/api/storage/{kind}/instances/{each}")
        wait_for_status(api, kind, each, "gone", timeout=60)


def test_a_live_change_resizes_the_container_and_a_restart_one_waits(api, docker_settings):
    backend = docker_settings()
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert wait_for_status(api, "redis", pk, "running", "failed", timeout=120)["status"] == "running"
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    container = container_of(backend, pk)
    started = container.attrs["State"]["StartedAt"]

    response = api.patch(f"/api/storage/redis/instances/{pk}", {"maxmemory": "128mb", "databases": 8}, format="json")

    assert response.status_code == 202, response.content
    body = response.json()
    container.reload()
    assert container.attrs["HostConfig"]["Memory"] == body["memory_limit"] == Instance.objects.get(pk=pk).memory_limit
    assert container.attrs["State"]["StartedAt"] == started, "a live change must not restart the container"
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
    assert client.config_get("databases") == {"databases": "16"}
    client.set("kept", "yes")

    assert api.patch(f"/api/storage/redis/instances/{pk}?apply=now", {}, format="json").status_code == 202
    assert wait_for_status(api, "redis", pk, "running", "unhealthy", timeout=120)["status"] == "running"
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert client.config_get("databases") == {"databases": "8"}
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
    assert client.get("kept") == b"yes"


def test_the_warm_pool_hands_out_containers_with_the_tenants_password_options_and_limit(api, docker_settings, settings):
    """On the Docker backend the pool's servers are containers: a create takes a ready one and is
    running within its request, with the tenant's password and options and no data; the pool's own
    password no longer opens it, and the container's memory limit follows its options."""
    backend = docker_settings()
    settings.STOCKROOM_POOL = {"mysql": 1, "redis": 1}
    services.fill_pool()
    servers = {server.kind: server for server in Instance.objects.filter(pool=True, status="running")}
    assert {kind: server.backend for kind, server in servers.items()} == {"mysql": "docker", "redis": "docker"}
    try:
        wanted = {"redis": {"maxmemory": "128mb"}, "mysql": {"innodb_buffer_pool_size": "32mb"}}
        answers = {kind: api.post(f"/api/storage/{kind}/instances?wait=10", body) for kind, body in wanted.items()}
        for kind, response in answers.items():
            assert response.status_code == 201, response.content
            assert response.json()["id"] == servers[kind].pk and "pool" in response.json()["timings"]
            container = container_of(backend, servers[kind].pk)
            assert container.attrs["HostConfig"]["Memory"] == Instance.objects.get(pk=servers[kind].pk).memory_limit

        config = answers["redis"].json()["config"]
        client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
        assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
        assert client.dbsize() == 0
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(
                host=config["host"], port=config["port"], password=servers["redis"].password, retry=NO_RETRY
            ).ping()

        config = answers["mysql"].json()["config"]
        login = {"host": config["host"], "port": config["port"], "user": config["username"]}
        with pymysql.connect(**login, password=config["password"], database=config["database"]) as db:
            with db.cursor() as cursor:
                cursor.execute("SELECT @@innodb_buffer_pool_size")
                assert cursor.fetchone() == (32 * 1024 * 1024,)
                cursor.execute("SHOW TABLES")
                assert cursor.fetchall() == ()
        with pytest.raises(pymysql.err.OperationalError):
            pymysql.connect(**login, password=servers["mysql"].password)
    finally:
        settings.STOCKROOM_POOL = {"mysql": 0, "redis": 0}
        services.fill_pool()
    assert not Instance.objects.filter(pool=True).live().exists()


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_file_of_another_server_imports_into_a_container(api, docker_settings, kind, foreign_dump, foreign_rdb):  # noqa: F811
    docker_settings()
    pk, config = running(api, kind)
    imports_and_reads_back(api, kind, config | {"id": pk}, foreign_dump, foreign_rdb)
