"""The swarm backend on a real three-node swarm (devtools/swarm.py): a manager in the root network
namespace and two workers in namespaces of their own, each a dockerd of its own.

Instances are asked for through the API, as a user would; the servers are reached from the root
namespace at the workers' addresses with the credentials the API shows, by redis-py and PyMySQL.
Traffic goes only to the run's own namespaces. Without root, dockerd or the test image these tests
are skipped, except under CI=true, where that is a failure (see test_swarm_cluster.py).
"""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pymysql
import pytest
import redis
from django.conf import settings as django_settings

from devtools.swarm import swarm
from provisioning import services
from provisioning.backends.base import get_backend
from provisioning.backends.swarm import SwarmBackend
from provisioning.engines import get_engine
from provisioning.engines.mysql import MySQL
from provisioning.engines.redis import ADMIN_USERNAME, NO_RETRY, Redis
from provisioning.errors import BackendError
from provisioning.models import Instance, InstanceEvent
from provisioning.reconciler import Reconciler
from provisioning.services import fleet

from .conftest import wait_for_status
from .test_export_verify import download, verify
from .test_imports import foreign_dump, foreign_rdb, imports_and_reads_back  # noqa: F401 - fixtures
from .test_lifecycle import act
from .test_point_in_time import KINDS as PITR_KINDS
from .test_point_in_time import Writes, restore_to
from .test_port_squatting import mysql_greeting, mysql_packet
from .test_reconcile_pass import delete_what_each_test_made  # noqa: F401
from .test_snapshots import execute, restore, rows, snapshot_of, stored
from .test_swarm_cluster import IMAGE, IMAGE_SOURCE, can_build  # noqa: F401
from .test_versions import OLD, flagged, upgrades

pytestmark = pytest.mark.django_db(transaction=True)
PORTAL_ID = "swarm-tests"


@pytest.fixture(scope="module")
def cluster(can_build):  # noqa: F811 - the fixture, imported
    with swarm(IMAGE, IMAGE_SOURCE) as built:
        (built.data_dir / "instances").mkdir()  # made on each node when it joins (the README's guide)
        yield built


@pytest.fixture
def backend(cluster, settings):
    options = {
        "manager_url": cluster.manager.url,
        "portal_address": cluster.manager.address,  # the bridge: where the workers see the portal
        "data_root": str(cluster.data_dir / "instances"),
        "images": {"mysql": IMAGE, "redis": IMAGE},
        "portal_id": PORTAL_ID,
    }
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "swarm": {"BACKEND": "provisioning.backends.swarm.SwarmBackend", "OPTIONS": options},
    }
    settings.STOCKROOM_DEFAULT_BACKEND = "swarm"
    backend = get_backend("swarm")
    yield backend
    # What a failed test left beside its instances (which delete_what_each_test_made deletes).
    for service in backend.orphans(known_ids=set(Instance.objects.values_list("pk", flat=True))):
        backend.remove_orphan(service)


def create(api, kind: str, **options) -> dict:
    response = api.post(f"/api/storage/{kind}/instances", options, format="json")
    assert response.status_code == 202, response.content
    instance = wait_for_status(api, kind, response.json()["id"], "running", "failed", timeout=180)
    assert instance["status"] == "running", instance["status_message"]
    return api.get(f"/api/storage/{kind}/instances/{instance['id']}/config").json() | {"id": instance["id"]}


def redis_of(config: dict, password: str | None = None) -> redis.Redis:
    return redis.Redis(
        host=config["host"],
        port=config["port"],
        password=password or config["password"],
        socket_timeout=5,
        socket_connect_timeout=5,
        retry=NO_RETRY,
    )


def mysql_of(config: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        connect_timeout=5,
    )


def refuses(host: str, port: int) -> bool:
    try:
        redis.Redis(host=host, port=port, socket_connect_timeout=2, retry=NO_RETRY).ping()
    except redis.ConnectionError as exc:
        return "refused" in str(exc)
    return False


def folder(cluster, kind: str, pk: int, host: str) -> Path:
    node = next(worker for worker in cluster.workers if worker.address == host)
    return cluster.data_dir / "instances" / PORTAL_ID / node.node_id / f"{kind}-{pk}"


def test_instances_land_on_both_workers_and_answer_with_the_credentials_shown(api, cluster, backend):
    first = create(api, "redis", maxmemory=48 * 2**20, maxmemory_policy="allkeys-lru")
    second = create(api, "redis")

    workers = {worker.address for worker in cluster.workers}
    assert {first["host"], second["host"]} == workers, "each goes on the worker with the most memory free"
    client = redis_of(first)
    client.set("greeting", "hello")
    assert client.get("greeting") == b"hello"
    assert client.config_get("maxmemory") == {"maxmemory": str(48 * 2**20)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    with pytest.raises(redis.AuthenticationError):
        redis_of(first, password="not-the-password").ping()
    # Its service is pinned to its node, limited and reserved as its engine says, on the host network.
    service = backend._service(Instance.objects.get(pk=first["id"]))
    spec = service.attrs["Spec"]["TaskTemplate"]
    node = next(worker for worker in cluster.workers if worker.address == first["host"])
    assert spec["Placement"]["Constraints"] == [f"node.id=={node.node_id}"]
    instance = Instance.objects.get(pk=first["id"])
    assert spec["Resources"]["Limits"]["MemoryBytes"] == instance.memory_limit
    assert spec["Resources"]["Reservations"]["MemoryBytes"] == instance.memory_reservation
    # No password in its environment or on its command line: files, as Swarm secrets, only.
    container = spec["ContainerSpec"]
    assert first["password"] not in repr(container.get("Env")) + repr(container.get("Command"))
    assert container["Secrets"], "its files are secrets"


def test_a_mysql_instance_keeps_its_rows_through_rotation_stop_and_start(api, cluster, backend):
    config = create(api, "mysql", charset="latin1")
    with mysql_of(config) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE t (v VARCHAR(20))")
        cursor.execute("INSERT INTO t VALUES ('kept')")
        db.commit()
        cursor.execute("SELECT @@character_set_server")
        assert cursor.fetchone()[0] == "latin1"

    act(api, "mysql", config["id"], "rotate-password", "running")
    new = api.get(f"/api/storage/mysql/instances/{config['id']}/config").json()
    assert new["password"] != config["password"]
    with pytest.raises(pymysql.err.OperationalError):
        mysql_of(config).close()

    act(api, "mysql", config["id"], "stop", "stopped")
    assert refuses(config["host"], config["port"])
    act(api, "mysql", config["id"], "start", "running")
    with mysql_of(new) as db, db.cursor() as cursor:
        cursor.execute("SELECT v FROM t")
        assert cursor.fetchall() == (("kept",),)


def test_a_redis_password_rotation_is_kept_by_the_server_across_a_restart(api, cluster, backend):
    config = create(api, "redis")
    redis_of(config).set("key", "value")

    act(api, "redis", config["id"], "rotate-password", "running")
    new = api.get(f"/api/storage/redis/instances/{config['id']}/config").json()
    with pytest.raises(redis.AuthenticationError):
        redis_of(config).ping()
    act(api, "redis", config["id"], "restart", "running")

    assert redis_of(new).get("key") == b"value"
    with pytest.raises(redis.AuthenticationError):
        redis_of(config).ping()


def test_a_delete_removes_the_service_its_secrets_its_data_and_frees_the_port(api, cluster, backend):
    config = create(api, "redis")
    pk = config["id"]
    redis_of(config).set("key", "value")
    assert folder(cluster, "redis", pk, config["host"]).is_dir()

    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202
    wait_for_status(api, "redis", pk, "gone", "deleted", timeout=120)

    manager = cluster.manager.client()
    assert not manager.services.list(filters={"label": f"io.stockroom.instance={pk}"})
    assert not manager.secrets.list(filters={"label": f"io.stockroom.instance={pk}"})
    assert not folder(cluster, "redis", pk, config["host"]).exists()
    deadline = time.monotonic() + 30
    while not refuses(config["host"], config["port"]):
        assert time.monotonic() < deadline, "the port still answers 30 s after the delete"
        time.sleep(0.2)


def test_no_usable_node_is_a_503_that_says_so(api, cluster, backend):
    manager = cluster.manager.client()
    paused = []
    try:
        for worker in cluster.workers:
            node = manager.nodes.get(worker.node_id)
            spec = node.attrs["Spec"] | {"Availability": "pause"}
            node.update(spec)
            paused.append(worker.node_id)
        response = api.post("/api/storage/redis/instances", {}, format="json")
        assert response.status_code == 503, response.content
        assert "No node of the swarm can take instances" in response.json()["detail"]
        assert not Instance.objects.exists()
    finally:
        for node_id in paused:
            node = manager.nodes.get(node_id)
            node.update(node.attrs["Spec"] | {"Availability": "active"})


def status_after_passes(api, kind: str, pk: int, wanted: str, timeout: float) -> tuple[dict, float]:
    """Run reconcile passes until the instance is `wanted`; it, and the seconds that took."""
    started = time.monotonic()
    while True:
        Reconciler().run_once()
        body = api.get(f"/api/storage/{kind}/instances/{pk}").json()
        if body["status"] == wanted:
            return body, time.monotonic() - started
        assert time.monotonic() - started < timeout, f"still {body['status']}: {body['status_message']}"
        time.sleep(0.5)


def test_a_worker_cut_off_makes_its_instances_unreachable_and_they_return_with_their_data(api, cluster, backend):
    cut_config, other_config = create(api, "redis"), create(api, "redis")
    cut = next(worker for worker in cluster.workers if worker.address == cut_config["host"])
    assert other_config["host"] != cut.address
    redis_of(cut_config).set("kept", "through the outage")
    time.sleep(1.5)  # appendfsync everysec: on its disk

    # Its veth down: the node, its daemon and its server are all out of reach, yet go on running.
    subprocess.run(["ip", "link", "set", cluster.veth(cut), "down"], check=True)
    try:
        body, seconds = status_after_passes(api, "redis", cut_config["id"], "unreachable", timeout=120)
        print(f"unreachable after {seconds:.1f} s of reconcile passes")
        assert cut.address in body["status_message"] or "node" in body["status_message"], body["status_message"]
        other = api.get(f"/api/storage/redis/instances/{other_config['id']}").json()
        assert other["status"] == "running", other["status_message"]
        assert redis_of(other_config).ping()
    finally:
        subprocess.run(["ip", "link", "set", cluster.veth(cut), "up"], check=True)

    body, seconds = status_after_passes(api, "redis", cut_config["id"], "running", timeout=180)
    print(f"running again {seconds:.1f} s after the link came back")
    assert redis_of(cut_config).get("kept") == b"through the outage"
    history = InstanceEvent.objects.filter(instance_id=cut_config["id"]).values_list("to_status", flat=True)
    assert list(history.order_by("pk"))[-2:] == ["unreachable", "running"]


def test_snapshots_stream_from_the_node_and_a_restore_brings_back_exactly_their_data(api, cluster, backend):
    """A job on the instance's node streams the snapshot to the portal's storage, and a restore
    streams it back: MySQL's rows and Redis's keys as they were, the writes after it gone."""
    mysql_config = create(api, "mysql")
    redis_config = create(api, "redis")
    execute(mysql_config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'one')")
    redis_of(redis_config).set("before", "1")

    mysql_snapshot = snapshot_of(api, "mysql", mysql_config["id"])
    redis_snapshot = snapshot_of(api, "redis", redis_config["id"])
    assert stored(mysql_snapshot).stat().st_size > 0 and stored(redis_snapshot).stat().st_size > 0
    # Loaded and checked by a throwaway server on a node; exported there as a portable file.
    for kind, snapshot in (("mysql", mysql_snapshot), ("redis", redis_snapshot)):
        checked = verify(api, kind, snapshot["id"])
        assert checked["verify_status"] == "passed", checked["verify_message"]
    _disposition, dump = download(api, "mysql", mysql_snapshot["id"])
    text = gzip.decompress(dump)
    assert b"CREATE TABLE `t`" in text and b"'one'" in text, text[-600:]
    execute(mysql_config, "INSERT INTO t VALUES (2, 'after')")
    redis_of(redis_config).set("after", "2")

    assert restore(api, "mysql", mysql_config["id"], mysql_snapshot["id"])["status"] == "running"
    assert restore(api, "redis", redis_config["id"], redis_snapshot["id"])["status"] == "running"

    assert rows(mysql_config) == [[1, "one"]]
    client = redis_of(redis_config)
    assert client.get("before") == b"1"
    assert client.get("after") is None
    # The folder on the node is root's again, its data the server's uid's.
    place = folder(cluster, "mysql", mysql_config["id"], mysql_config["host"])
    assert place.stat().st_uid == 0 and place.stat().st_mode & 0o777 == 0o700
    assert (place / "data").stat().st_uid == backend.uid(Instance.objects.get(pk=mysql_config["id"]))
    # Its jobs and their secrets are gone.
    manager = cluster.manager.client()
    assert not manager.services.list(filters={"label": "io.stockroom.job=true"})
    assert not manager.secrets.list(filters={"label": "io.stockroom.job=true"})


def node_of(cluster, host: str):
    return next(worker for worker in cluster.workers if worker.address == host)


def test_a_drain_moves_each_instance_with_its_data_to_the_other_worker(api, cluster, backend):
    mysql_config = create(api, "mysql")
    redis_config = create(api, "redis", maxmemory=40 * 2**20)
    drained = node_of(cluster, redis_config["host"])
    if mysql_config["host"] != drained.address:  # both on the drained one: one create more lands there
        mysql_config = create(api, "mysql")
    assert mysql_config["host"] == drained.address
    execute(mysql_config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'moved')")
    redis_of(redis_config).set("moved", "yes")
    try:
        row, said = fleet.act("swarm", drained.node_id, "drain", by="an operator")

        assert row.availability == "pause"
        assert "moving its 2 running instances" in said and "stay" not in said, said
        for kind, config in (("mysql", mysql_config), ("redis", redis_config)):
            body = wait_for_status(api, kind, config["id"], "running", timeout=180)
            assert body["status_message"].startswith(f"Moved from {drained.address}:{config['port']} to "), body
            print(kind, body["status_message"])  # the pause, for the README (pytest -s)
            new = api.get(f"/api/storage/{kind}/instances/{config['id']}/config").json()
            assert new["host"] != drained.address and new["password"] == config["password"]
            assert refuses(drained.address, config["port"]), "the old server is gone"
            event = InstanceEvent.objects.filter(instance_id=config["id"], type=services.moves.MOVED).get()
            assert "writes were refused for" in event.reason
            assert Instance.objects.get(pk=config["id"]).timings["move_pause"] > 0
            if kind == "mysql":
                assert rows(new) == [[1, "moved"]]
            else:
                assert redis_of(new).get("moved") == b"yes"
                assert redis_of(new).config_get("maxmemory") == {"maxmemory": str(40 * 2**20)}
        assert not list((cluster.data_dir / "instances" / PORTAL_ID / drained.node_id).iterdir())
        # The paused node takes no new instance.
        assert create(api, "redis")["host"] != drained.address
    finally:
        backend.set_availability(drained.node_id, "active")


def test_a_move_that_fails_on_the_new_node_leaves_the_server_where_it_was_with_its_data(
    api, cluster, backend, monkeypatch
):
    config = create(api, "redis")
    source = node_of(cluster, config["host"])
    target = next(worker for worker in cluster.workers if worker.node_id != source.node_id)
    redis_of(config).set("before", "1")
    fill = SwarmBackend._fill

    def disk_full(self, instance, node, *args, **kwargs):
        fill(self, instance, node, *args, **kwargs)
        raise BackendError("the new node's disk is full")

    monkeypatch.setattr(SwarmBackend, "_fill", disk_full)
    try:
        fleet.act("swarm", source.node_id, "drain", by="an operator")
        body = wait_for_status(api, "redis", config["id"], "running", "unhealthy", timeout=180)
    finally:
        backend.set_availability(source.node_id, "active")

    assert body["status"] == "running", body["status_message"]
    assert "disk is full" in body["status_message"], body["status_message"]
    after = api.get(f"/api/storage/redis/instances/{config['id']}/config").json()
    assert (after["host"], after["port"]) == (config["host"], config["port"])
    client = redis_of(config)
    assert client.get("before") == b"1"
    client.set("after", "2")  # it takes writes again
    assert not folder(cluster, "redis", config["id"], target.address).exists(), "the new folder is gone"
    assert all(backend._pinned_to(service) == source.node_id for service in backend._services({}))


class WorkerDied(BaseException):
    """What a SIGKILL does to a move: nothing after it runs, not even its own clean-up."""


@pytest.mark.parametrize("dies_after", ["_fill", "_start_restored"])
def test_a_move_whose_worker_died_is_put_back_or_finished_by_its_recovery(
    api, cluster, backend, monkeypatch, dies_after
):
    """The worker dies with the old server gone and the data in the new folder (`_fill`): the
    recovery puts the server back where it was, with its data. It dies once the new server answers
    (`_start_restored`): the recovery finishes the move, keeping what the new server took since."""
    config = create(api, "redis", appendfsync="always")
    source = node_of(cluster, config["host"])
    target = next(worker for worker in cluster.workers if worker.node_id != source.node_id)
    redis_of(config).set("before", "1")
    step = getattr(SwarmBackend, dies_after)

    def then_die(self, *args, **kwargs):
        step(self, *args, **kwargs)
        raise WorkerDied

    monkeypatch.setattr(SwarmBackend, dies_after, then_die)
    try:
        with pytest.raises(WorkerDied):
            fleet.act("swarm", source.node_id, "drain", by="an operator")
    finally:
        backend.set_availability(source.node_id, "active")
    monkeypatch.undo()
    left = Instance.objects.get(pk=config["id"])
    assert left.status == "moving" and left.host == target.address
    if dies_after == "_start_restored":
        redis_of(api.get(f"/api/storage/redis/instances/{config['id']}/config").json()).set("after", "2")

    services.recover(config["id"])

    body = api.get(f"/api/storage/redis/instances/{config['id']}").json()
    assert body["status"] == "running", body["status_message"]
    now = api.get(f"/api/storage/redis/instances/{config['id']}/config").json()
    if dies_after == "_fill":
        assert (now["host"], now["port"]) == (config["host"], config["port"])
        assert "runs where it was again, with its data" in body["status_message"]
        gone = target
    else:
        assert now["host"] == target.address
        assert "the move had finished" in body["status_message"]
        assert redis_of(now).get("after") == b"2"
        gone = source
    assert redis_of(now).get("before") == b"1"
    redis_of(now).set("writable", "yes")
    assert not folder(cluster, "redis", config["id"], gone.address).exists(), "nothing left where it is not"
    assert Instance.objects.get(pk=config["id"]).move_source is None


def test_an_unreachable_instance_is_evacuated_from_its_last_snapshot(api, cluster, backend):
    config = create(api, "redis")
    cut = node_of(cluster, config["host"])
    redis_of(config).set("in the snapshot", "1")
    snapshot_of(api, "redis", config["id"])
    redis_of(config).set("after the snapshot", "2")
    subprocess.run(["ip", "link", "set", cluster.veth(cut), "down"], check=True)
    try:
        status_after_passes(api, "redis", config["id"], "unreachable", timeout=120)
        response = api.post(f"/api/storage/redis/instances/{config['id']}/evacuate")
        assert response.status_code == 202, response.content

        body = wait_for_status(api, "redis", config["id"], "running", "unreachable", timeout=180)
        assert body["status"] == "running", body["status_message"]
        assert "whatever was written after that is lost" in body["status_message"]
        new = api.get(f"/api/storage/redis/instances/{config['id']}/config").json()
        assert new["host"] != cut.address
        client = redis_of(new)
        assert client.get("in the snapshot") == b"1"
        assert client.get("after the snapshot") is None
    finally:
        subprocess.run(["ip", "link", "set", cluster.veth(cut), "up"], check=True)


def test_a_server_runs_confined_and_comes_back_with_its_data_when_killed(api, cluster, backend):
    config = create(api, "redis")
    client = redis_of(config)
    client.set("kept", "1")
    response = api.patch(f"/api/storage/redis/instances/{config['id']}", {"timeout": 300}, format="json")
    assert response.status_code == 202 and response.json()["pending_options"] == {}, response.content
    assert client.config_get("timeout") == {"timeout": "300"}  # live: on the server only, not in its secrets
    time.sleep(1.5)  # appendfsync everysec: on its disk
    instance = Instance.objects.get(pk=config["id"])
    worker = node_of(cluster, config["host"])
    task = backend._running_tasks(instance)[0]
    container = worker.client().containers.get(task["Status"]["ContainerStatus"]["ContainerID"])

    # Its own uid, no capability, a read-only root, and the kernel holds it to its memory limit.
    uid = backend.uid(instance)
    assert container.attrs["Config"]["User"] == f"{uid}:{uid}"
    assert [cap.upper().removeprefix("CAP_") for cap in container.attrs["HostConfig"]["CapDrop"]] == ["ALL"]
    assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    cgroup = Path("/sys/fs/cgroup/memory") / worker.cgroup_parent.strip("/") / container.id
    assert int((cgroup / "memory.limit_in_bytes").read_text()) == instance.memory_limit
    # And to its number of processes and threads (Swarm's Limits.Pids).
    pids = Path("/sys/fs/cgroup/pids") / worker.cgroup_parent.strip("/") / container.id / "pids.max"
    assert int(pids.read_text()) == get_engine("redis").pids_limit == container.attrs["HostConfig"]["PidsLimit"]
    # The tenant tries to point the server at another folder, and to read its config: refused.
    with pytest.raises(redis.ResponseError):
        client.config_set("dir", "/tmp")
    with pytest.raises(redis.ResponseError):
        client.execute_command("ACL", "LIST")

    server = container.attrs["State"]["Pid"]
    assert server > 0, container.attrs["State"]  # os.kill(0) would kill this test's process group
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:  # the reconciler's heal starts it again (Swarm does not: see the service's restart policy)
        Reconciler().run_once()
        body = api.get(f"/api/storage/redis/instances/{config['id']}").json()
        try:
            if body["status"] == "running" and redis_of(config).get("kept") == b"1":
                break
        except redis.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"still {body['status']}: {body['status_message']}"
        time.sleep(1)
    assert redis_of(config).config_get("timeout") == {"timeout": "300"}, "the live change outlived the crash"


def test_a_service_the_portal_no_longer_knows_is_an_orphan_and_is_removed(api, cluster, backend, settings):
    config = create(api, "redis")
    Instance.objects.filter(pk=config["id"]).delete()  # as if the portal's database had lost it
    settings.STOCKROOM_ORPHAN_GRACE = 0

    Reconciler().run_once()  # seen
    Reconciler().run_once()  # past its grace: removed

    assert not cluster.manager.client().services.list(filters={"label": f"io.stockroom.instance={config['id']}"})
    assert not folder(cluster, "redis", config["id"], config["host"]).exists()
    deadline = time.monotonic() + 30
    while not refuses(config["host"], config["port"]):
        assert time.monotonic() < deadline, "the orphan still answers"
        time.sleep(0.2)


ROOT_LOGIN = """
import sys, pymysql
host, port, password = sys.stdin.read().split()
try:
    pymysql.connect(host=host, port=int(port), user="root", password=password, connect_timeout=5,
                    ssl={"ca": None}).close()  # over TLS (unverified), as if it were the portal
    print("logged in")
except pymysql.err.OperationalError as exc:
    print("refused", exc.args[0])
"""


def test_mysql_root_accepts_the_portal_alone_even_with_its_password(api, cluster, backend):
    """The attack: another host that has learnt the admin password logs in as root. It is refused;
    the portal, from its own address, is let in."""
    config = create(api, "mysql")
    instance = Instance.objects.get(pk=config["id"])
    other = next(worker for worker in cluster.workers if worker.address != config["host"])
    said = subprocess.run(
        ["nsenter", f"--net=/run/netns/{other.netns}", sys.executable, "-c", ROOT_LOGIN],
        input=f"{config['host']} {config['port']} {instance.admin_password}",
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert said == "refused 1045", said  # access denied: no root account for that address

    # From the portal's own address, but without TLS: refused too (REQUIRE SSL).
    with pytest.raises(pymysql.err.OperationalError) as refused:
        pymysql.connect(
            host=config["host"], port=config["port"], user="root", password=instance.admin_password, ssl_disabled=True
        )
    assert refused.value.args[0] == 1045, refused.value

    with (
        backend.admin(instance) as admin,
        MySQL.client(admin, user="root", password=instance.admin_password) as db,
        db.cursor() as cursor,
    ):
        assert admin.tls_ca, "the portal logs in over TLS"
        cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        assert cursor.fetchone()[1], "the session is encrypted"
        cursor.execute("SELECT CURRENT_USER()")
        assert cursor.fetchone()[0] == f"root@{cluster.manager.address}"


# Listens on $1 at the ports after $3 and plays a server that takes anything: it greets with $2 (hex),
# answers whatever it hears with "+OK", and prints all it heard (hex) once its standard input ends.
SQUAT = """
import socket, sys, threading
host, greeting, ports = sys.argv[1], bytes.fromhex(sys.argv[2]), [int(port) for port in sys.argv[3:]]
heard = bytearray()
def serve(listener):
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        with connection:
            connection.settimeout(2)
            try:
                connection.sendall(greeting)
                while chunk := connection.recv(65536):
                    heard.extend(chunk)
                    connection.sendall(b"+OK\\r\\n")
            except OSError:
                pass
listeners = [socket.create_server((host, port)) for port in ports]
for listener in listeners:
    threading.Thread(target=serve, args=(listener,), daemon=True).start()
print("listening", flush=True)
sys.stdin.read()  # until the test is done
sys.stdout.write(heard.hex())
"""


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_squatter_on_a_stopped_servers_ports_hears_no_password(api, cluster, backend, kind):
    """The attack: someone with a shell on a node listens on a stopped instance's ports, as if it were
    its server, and waits for the portal's probes and logins. The portal speaks TLS there and checks
    the certificate first: the squatter hears a TLS greeting and never a password."""
    config = create(api, kind)
    response = api.post(f"/api/storage/{kind}/instances/{config['id']}/stop")
    assert response.status_code == 202, response.content
    wait_for_status(api, kind, config["id"], "stopped", timeout=120)
    instance = Instance.objects.get(pk=config["id"])
    node = node_of(cluster, config["host"])
    ports = sorted({config["port"], backend.portal_endpoint(instance).port})
    # MySQL's server speaks first: a greeting that offers TLS (one that does not is refused at once).
    greeting = mysql_packet(0, mysql_greeting(tls=True)) if kind == "mysql" else b"+OK\r\n"
    squatter = subprocess.Popen(
        ["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-c", SQUAT, config["host"], greeting.hex(),
         *map(str, ports)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert squatter.stdout.readline().strip() == "listening"
        with pytest.raises(Exception):  # noqa: B017 - the probe, with the user's password: the handshake fails
            backend.probe(instance, timeout=3)
        with pytest.raises(Exception):  # noqa: B017 - the portal's own account: so does this one
            backend.client_connections(instance)
        heard = bytes.fromhex(squatter.communicate(input="", timeout=30)[0])
    finally:
        if squatter.poll() is None:
            squatter.kill()
    assert heard, "the portal did connect to the squatter"
    for secret in (instance.password, instance.admin_password):
        assert secret.encode() not in heard
    assert b"\x16\x03" in heard[:64], "what it heard was a TLS handshake (after MySQL's request for it)"


def test_redis_serves_the_portal_tls_alone_on_a_port_of_its_own(api, cluster, backend):
    """A Redis with `tls` off serves its users plaintext on its port, and the portal TLS alone on the
    next one, which the portal keeps free: instances get every other port."""
    config = create(api, "redis")
    instance = Instance.objects.get(pk=config["id"])
    portal = backend.portal_endpoint(instance)
    first = django_settings.STOCKROOM_PORT_RANGE[0]
    assert (portal.port, (config["port"] - first) % 2) == (config["port"] + 1, 0)
    with pytest.raises(redis.ConnectionError):  # plaintext there is not answered
        redis.Redis(host=config["host"], port=portal.port, socket_timeout=3, retry=NO_RETRY).ping()
    admin = Redis.client(portal, username=ADMIN_USERNAME, password=instance.admin_password, timeout=5)
    assert admin.ping() and admin.connection_pool.connection_class.__name__ == "SSLConnection"
    assert redis_of(config).ping(), "the users' port is plaintext, as asked"


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_restore_to_a_time_has_exactly_the_writes_before_it(api, cluster, backend, kind):
    """Point-in-time recovery on the swarm: the logs archived from the node by jobs, and replayed there."""
    writer, read, prepare = PITR_KINDS[kind]
    config = create(api, kind)
    prepare(config)
    snapshot_of(api, kind, config["id"])
    time.sleep(1)  # the window begins with the whole second after the base was finished
    writes = Writes(writer(config))
    writes.run(list(range(1, 7)), archive_after=(2, 4), pk=config["id"])

    done = restore_to(api, kind, config["id"], writes.second_after(3))

    assert read(config) == [1, 2, 3]
    assert done["status_message"].startswith("Restored to ")


def test_a_mysql_server_on_old_binaries_is_flagged_and_a_restart_upgrades_its_data(api, cluster, backend):
    """As on one host (test_versions.py): the instance's data last upgraded by an older major
    version; a restart runs mariadb-upgrade in a job beside the server, and the rows stay."""
    config = create(api, "mysql")
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'kept')")
    current = Instance.objects.get(pk=config["id"]).server_version
    Instance.objects.filter(pk=config["id"]).update(server_version=OLD)
    mark = folder(cluster, "mysql", config["id"], config["host"]) / "data" / "mysql_upgrade_info"
    mark.write_text("10.6.16-MariaDB")
    assert flagged(api, "mysql", config["id"]) is True

    after = act(api, "mysql", config["id"], "restart", "running", "unhealthy")

    assert after["status"] == "running", after["status_message"]
    assert after["server_version"] == current and after["upgrade_available"] is False
    assert mark.read_text().strip("\0\n") == current.split("-")[0] + "-MariaDB", "mariadb-upgrade ran to the end"
    [event] = upgrades(config["id"])
    assert event.startswith(f"Upgraded from {OLD} to {current}: mariadb-upgrade")
    assert rows(config) == [[1, "kept"]]


def test_a_change_of_size_waits_for_the_restart_which_takes_the_new_limit(api, cluster, backend):
    """Swarm cannot change a running task's memory limit: a Redis grown past it (maxmemory) would be
    killed by the kernel. The growth waits for the restart, which runs the server with both."""
    config = create(api, "redis")
    before = Instance.objects.get(pk=config["id"])
    client = redis_of(config)
    response = api.patch(f"/api/storage/redis/instances/{config['id']}", {"maxmemory": "128mb"}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["pending_options"] == {"maxmemory": 128 * 2**20}
    assert client.config_get("maxmemory") == {"maxmemory": str(before.options["maxmemory"])}

    after = act(api, "redis", config["id"], "restart", "running", "unhealthy")

    assert after["status"] == "running", after["status_message"]
    instance = Instance.objects.get(pk=config["id"])
    assert instance.memory_limit > before.memory_limit
    spec = backend._service(instance).attrs["Spec"]["TaskTemplate"]["Resources"]
    assert spec["Limits"]["MemoryBytes"] == instance.memory_limit
    assert redis_of(config).config_get("maxmemory") == {"maxmemory": str(128 * 2**20)}


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_file_of_another_server_imports_on_a_node(api, cluster, backend, kind, foreign_dump, foreign_rdb):  # noqa: F811
    """Imports: the file checked and loaded (or restored) in jobs on the instance's node."""
    imports_and_reads_back(api, kind, create(api, kind), foreign_dump, foreign_rdb)
