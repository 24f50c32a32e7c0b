"""Snapshots, restores and clones, through the API, against real servers and real clients (local backend).

Tasks run inline here (pytest.ini), so a snapshot or restore is done when its request returns.
"""

import dataclasses
import hashlib
import io
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql
import pytest
import redis
from django.conf import settings

from provisioning.backends.base import BackendError, get_backend
from provisioning.backends.local import processes_under
from provisioning.engines import get_engine
from provisioning.engines.base import read_out
from provisioning.engines.redis import _manifest as redis_manifest
from provisioning.models import Instance, LogFile, Snapshot
from provisioning.services import logs, store

from .conftest import Worker, instance_dir, server_dir, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def create(api, kind: str, **body) -> dict:
    response = api.post(f"/api/storage/{kind}/instances", body, format="json")
    assert response.status_code == 202, response.content
    instance = wait_for_status(api, kind, response.json()["id"], "running", "failed")
    assert instance["status"] == "running", instance["status_message"]
    return instance


def config_of(api, kind: str, pk: int) -> dict:
    response = api.get(f"/api/storage/{kind}/instances/{pk}/config")
    assert response.status_code == 200, response.content
    return response.json()


def snapshot_of(api, kind: str, pk: int) -> dict:
    response = api.post(f"/api/storage/{kind}/instances/{pk}/snapshots")
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "creating"
    snapshot = api.get(f"/api/storage/{kind}/snapshots/{response.json()['id']}").json()
    assert snapshot["status"] == "ready", snapshot["status_message"]
    return snapshot


def restore(api, kind: str, pk: int, snapshot: int) -> dict:
    response = api.post(f"/api/storage/{kind}/instances/{pk}/restore", {"snapshot": snapshot}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "restoring"
    return wait_for_status(api, kind, pk, "running", "unhealthy", "failed")


def mysql(config: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        autocommit=True,
    )


def execute(config: dict, *statements: str) -> None:
    with mysql(config) as db, db.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def rows(config: dict, table: str = "t") -> list:
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute(f"SELECT * FROM {table} ORDER BY id")
        return [list(row) for row in cursor.fetchall()]


def redis_client(config: dict) -> redis.Redis:
    return redis.Redis(host=config["host"], port=config["port"], password=config["password"], decode_responses=True)


def stored(snapshot: dict):
    return settings.STOCKROOM_SNAPSHOT_DIR / Snapshot.objects.get(pk=snapshot["id"]).file


def test_a_mysql_restore_brings_back_exactly_the_rows_of_the_snapshot(api):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(
        config,
        "CREATE TABLE t (id INT PRIMARY KEY, note TEXT) ENGINE=InnoDB",
        "INSERT INTO t VALUES (1, 'one'), (2, 'two')",
        "CREATE TABLE a (id INT PRIMARY KEY) ENGINE=Aria",
        "INSERT INTO a VALUES (10)",
    )
    snapshot = snapshot_of(api, "mysql", pk)
    assert snapshot["instance"] == pk and snapshot["trigger"] == "manual" and snapshot["size_bytes"] > 0

    # The file: the portal's alone, outside the instance, what the checksum says, and no password in it.
    path = stored(snapshot)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.STOCKROOM_SNAPSHOT_DIR.stat().st_mode) == 0o700
    content = path.read_bytes()
    assert snapshot["checksum"] == "sha256:" + hashlib.sha256(content).hexdigest()
    assert len(content) == snapshot["size_bytes"]
    for secret in (config["password"], Snapshot.objects.get(pk=snapshot["id"]).instance.admin_password):
        assert secret.encode() not in content

    execute(config, "INSERT INTO t VALUES (3, 'three')", "UPDATE t SET note = 'changed' WHERE id = 1")
    execute(config, "DROP TABLE a")
    restored = restore(api, "mysql", pk, snapshot["id"])
    assert restored["status"] == "running", restored["status_message"]
    # The same credentials, exactly the snapshot's rows, in both engines' tables.
    assert config_of(api, "mysql", pk)["password"] == config["password"]
    assert rows(config) == [[1, "one"], [2, "two"]]
    assert rows(config, "a") == [[10]]
    # Only the portal's root and the user's account: the backup account is gone.
    admin = Snapshot.objects.get(pk=snapshot["id"]).instance.admin_password
    with pymysql.connect(unix_socket=str(server_dir("mysql", pk) / "server.sock"), user="root", password=admin) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT User, Host FROM mysql.global_priv ORDER BY User")
            assert cursor.fetchall() == (("app", "%"), ("mariadb.sys", "localhost"), ("root", "localhost"))


def test_writes_go_on_during_a_mysql_snapshot_and_it_is_consistent(api):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT) ENGINE=InnoDB")
    written, errors, stop = [], [], threading.Event()

    def writer():
        with mysql(config) as db, db.cursor() as cursor:
            while not stop.is_set():
                try:
                    cursor.execute("INSERT INTO t VALUES (%s, 'x')", [len(written) + 1])
                    written.append(len(written) + 1)
                except pymysql.Error as exc:
                    errors.append(exc)
                    return

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(written) < 50:
            pass
        before = len(written)
        snapshot = snapshot_of(api, "mysql", pk)
        after = len(written)
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert after > before, "no write went through while the snapshot was taken"
    restored = restore(api, "mysql", pk, snapshot["id"])
    assert restored["status"] == "running", restored["status_message"]
    ids = [row[0] for row in rows(config)]
    # A moment's state: every row committed up to some point, and nothing after it.
    assert before <= len(ids) <= after
    assert ids == list(range(1, len(ids) + 1))


def test_a_redis_restore_brings_back_exactly_the_keys_of_the_snapshot(api):
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    client = redis_client(config)
    client.set("a", "1")
    client.hset("h", mapping={"x": "y"})
    client.rpush("l", "1", "2", "3")
    snapshot = snapshot_of(api, "redis", pk)
    content = stored(snapshot).read_bytes()
    assert snapshot["checksum"] == "sha256:" + hashlib.sha256(content).hexdigest()
    # ACL users live in users.acl, never in an RDB: neither a password nor its hash is in it.
    admin_password = Snapshot.objects.get(pk=snapshot["id"]).instance.admin_password
    for secret in (config["password"], admin_password):
        assert secret.encode() not in content
        assert hashlib.sha256(secret.encode()).hexdigest().encode() not in content

    client.set("b", "2")
    client.delete("a")
    client.rpush("l", "4")
    restored = restore(api, "redis", pk, snapshot["id"])
    assert restored["status"] == "running", restored["status_message"]
    client = redis_client(config)
    assert sorted(client.keys()) == ["a", "h", "l"]
    assert client.hgetall("h") == {"x": "y"}
    assert client.lrange("l", 0, -1) == ["1", "2", "3"]
    # After a restart too: the restored data is the server's own append-only file now.
    assert api.post(f"/api/storage/redis/instances/{pk}/restart").status_code == 202
    assert wait_for_status(api, "redis", pk, "running")["status"] == "running"
    assert sorted(redis_client(config).keys()) == ["a", "h", "l"]


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_clone_has_the_data_new_credentials_and_is_independent(api, kind):
    source = create(api, kind, disk="300mb")
    source_config = config_of(api, kind, source["id"])
    if kind == "mysql":
        execute(source_config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'seed')")
    else:
        redis_client(source_config).set("seed", "1")
    snapshot = snapshot_of(api, kind, source["id"])

    clone = create(api, kind, name="clone", from_snapshot=snapshot["id"])
    clone_config = config_of(api, kind, clone["id"])
    assert clone["options"]["disk"] == 300 * 1024 * 1024  # the source's options
    assert clone_config["password"] != source_config["password"]
    if kind == "mysql":
        assert rows(clone_config) == [[1, "seed"]]
        execute(clone_config, "INSERT INTO t VALUES (2, 'clone only')")
        assert rows(source_config) == [[1, "seed"]]
        # The source's password does not open the clone.
        with pytest.raises(pymysql.err.OperationalError):
            mysql({**clone_config, "password": source_config["password"]})
    else:
        clone_client = redis_client(clone_config)
        assert clone_client.get("seed") == "1"
        clone_client.set("clone-only", "1")
        assert redis_client(source_config).get("clone-only") is None
        with pytest.raises(redis.AuthenticationError):
            redis_client({**clone_config, "password": source_config["password"]}).ping()
    assert api.get("/api/usage").json()["instances"] == 2  # the clone counts toward the quota


def test_snapshots_outlive_their_instance_and_are_listed_by_kind(api):
    instance = create(api, "redis")
    pk = instance["id"]
    redis_client(config_of(api, "redis", pk)).set("kept", "yes")
    snapshot = snapshot_of(api, "redis", pk)
    listed = api.get(f"/api/storage/redis/instances/{pk}/snapshots").json()
    assert [item["id"] for item in listed["results"]] == [snapshot["id"]]

    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202
    wait_for_status(api, "redis", pk, "gone")
    listed = api.get("/api/storage/redis/snapshots", {"instance": pk}).json()["results"]
    # Newest first: the one the delete took, then the user's own.
    assert [(item["id"], item["trigger"]) for item in listed][1:] == [(snapshot["id"], "manual")]
    assert listed[0]["trigger"] == "before-delete"
    assert api.get("/api/storage/mysql/snapshots").json()["results"] == []
    clone = create(api, "redis", from_snapshot=snapshot["id"])
    assert redis_client(config_of(api, "redis", clone["id"])).get("kept") == "yes"

    path = stored(snapshot)
    assert api.delete(f"/api/storage/redis/snapshots/{snapshot['id']}").status_code == 204
    assert not path.exists()
    assert api.get(f"/api/storage/redis/snapshots/{snapshot['id']}").status_code == 404


def test_a_damaged_snapshot_is_not_restored(api):
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    redis_client(config).set("before", "1")
    snapshot = snapshot_of(api, "redis", pk)
    redis_client(config).set("after", "1")
    path = stored(snapshot)
    path.write_bytes(path.read_bytes()[:-8] + b"tampered")
    restored = restore(api, "redis", pk, snapshot["id"])
    assert restored["status"] == "unhealthy"
    assert "damaged" in restored["status_message"]
    assert sorted(redis_client(config).keys()) == ["after", "before"]  # the server was never touched


def test_outsiders_and_other_kinds_get_404_and_a_busy_instance_409(api, outsider):
    instance = create(api, "redis")
    pk = instance["id"]
    snapshot = snapshot_of(api, "redis", pk)
    sid = snapshot["id"]
    mine = create(outsider, "redis")

    assert outsider.get(f"/api/storage/redis/snapshots/{sid}").status_code == 404
    assert outsider.delete(f"/api/storage/redis/snapshots/{sid}").status_code == 404
    assert outsider.get("/api/storage/redis/snapshots").json()["results"] == []
    assert outsider.get(f"/api/storage/redis/instances/{pk}/snapshots").status_code == 404
    assert outsider.post(f"/api/storage/redis/instances/{pk}/snapshots").status_code == 404
    # Another user's snapshot, into one's own instance or a clone: it does not exist for them.
    response = outsider.post(f"/api/storage/redis/instances/{mine['id']}/restore", {"snapshot": sid}, format="json")
    assert response.status_code == 404
    assert outsider.post("/api/storage/redis/instances", {"from_snapshot": sid}, format="json").status_code == 404
    # A snapshot of another kind does not exist under this one.
    assert api.get(f"/api/storage/mysql/snapshots/{sid}").status_code == 404
    assert api.post("/api/storage/mysql/instances", {"from_snapshot": sid}, format="json").status_code == 404
    assert api.post(f"/api/storage/redis/instances/{pk}/restore", {"snapshot": "x"}, format="json").status_code == 400
    assert api.get("/api/storage/redis/snapshots", {"instance": "one"}).status_code == 400
    assert Snapshot.objects.get(pk=sid).status == "ready"

    assert api.post(f"/api/storage/redis/instances/{pk}/stop").status_code == 202
    wait_for_status(api, "redis", pk, "stopped")
    response = api.post(f"/api/storage/redis/instances/{pk}/restore", {"snapshot": sid}, format="json")
    assert response.status_code == 409
    assert api.post(f"/api/storage/redis/instances/{pk}/snapshots").status_code == 409


def test_the_instance_page_takes_restores_clones_and_deletes_snapshots(api, alice, charlie, client):
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    redis_client(config).set("page", "1")
    client.force_login(alice)
    page = client.get(f"/instances/{pk}/")
    assert b"Backups" in page.content and b"Snapshot now" in page.content
    assert b"A snapshot is taken every 24 hours while it runs; the newest 7 are kept." in page.content

    response = client.post(f"/instances/{pk}/snapshot/")
    assert response.status_code == 302
    snapshot = Snapshot.objects.get(instance_id=pk)
    assert snapshot.status == "ready"
    page = client.get(f"/instances/{pk}/panel/").content.decode()
    assert f'data-snapshot="{snapshot.pk}"' in page and "Restore…" in page and "Clone" in page

    redis_client(config).set("later", "1")
    assert client.post(f"/instances/{pk}/restore/{snapshot.pk}/").status_code == 302
    assert wait_for_status(api, "redis", pk, "running")["status"] == "running"
    assert sorted(redis_client(config).keys()) == ["page"]

    response = client.post(f"/snapshots/{snapshot.pk}/clone/", {"name": "from-page"})
    clone = Snapshot.objects.get(pk=snapshot.pk).owner.instances.get(name="from-page")
    assert response.status_code == 302 and response.url == f"/instances/{clone.pk}/"
    assert redis_client(config_of(api, "redis", wait_for_status(api, "redis", clone.pk, "running")["id"])).get("page")

    # An outsider's requests find nothing.
    client.force_login(charlie)
    assert client.post(f"/instances/{pk}/snapshot/").status_code == 404
    assert client.post(f"/instances/{pk}/restore/{snapshot.pk}/").status_code == 404
    assert client.post(f"/snapshots/{snapshot.pk}/clone/").status_code == 404
    assert client.post(f"/snapshots/{snapshot.pk}/delete/").status_code == 404
    client.force_login(alice)
    assert client.post(f"/snapshots/{snapshot.pk}/delete/").status_code == 302
    assert not Snapshot.objects.filter(pk=snapshot.pk).exists()


def test_the_admin_lists_snapshots_with_the_storage_each_user_takes(api, admin_client):
    instance = create(api, "redis")
    redis_client(config_of(api, "redis", instance["id"])).set("k", "v")
    snapshot = snapshot_of(api, "redis", instance["id"])
    page = admin_client.get("/admin/provisioning/snapshot/", {"status__exact": "ready", "kind": "redis"})
    assert page.status_code == 200
    text = page.content.decode()
    assert 'id="storage-per-user"' in text and "alice" in text
    assert f"/admin/provisioning/snapshot/{snapshot['id']}/change/" in text
    response = admin_client.post(
        "/admin/provisioning/snapshot/",
        {"action": "delete_snapshots", "_selected_action": [snapshot["id"]]},
    )
    assert response.status_code == 302
    assert not Snapshot.objects.filter(pk=snapshot["id"]).exists()


def test_a_delete_can_be_undone_from_its_before_delete_snapshot(api, alice, client):
    instance = create(api, "mysql", name="orders")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'precious')")
    assert api.delete(f"/api/storage/mysql/instances/{pk}").status_code == 202
    wait_for_status(api, "mysql", pk, "gone")

    listed = api.get("/api/storage/mysql/snapshots", {"instance": pk}).json()["results"]
    assert [item["trigger"] for item in listed] == ["before-delete"]
    kept = listed[0]
    assert kept["status"] == "ready" and kept["expires_at"]
    assert f"Snapshot {kept['id']} of its data is kept" in Snapshot.objects.get(pk=kept["id"]).instance.status_message

    client.force_login(alice)
    dashboard = client.get("/").content.decode()
    assert 'id="recently-deleted"' in dashboard and f'data-snapshot="{kept["id"]}"' in dashboard
    back = create(api, "mysql", name="orders", from_snapshot=kept["id"])
    assert rows(config_of(api, "mysql", back["id"])) == [[1, "precious"]]


# Faults: a worker killed in the middle ------------------------------------------------------------

RECOVERY = {"STOCKROOM_STUCK_TIMEOUT": "2", "STOCKROOM_CLAIM_SECONDS": "4", "STOCKROOM_RECONCILE_INTERVAL": "1"}


def helper_running(pk: int, names: tuple[str, ...], *, kind: str = "mysql") -> bool:
    """Whether one of the programs `names` runs beside instance `pk`'s server (in its folder)."""
    for pid in processes_under(instance_dir(kind, pk)):
        try:
            if (Path("/proc") / str(pid) / "comm").read_text().strip() in names:
                return True
        except OSError:
            continue
    return False


def fill(config: dict, megabytes: int) -> None:
    """A table of incompressible rows, so copying it takes a moment."""
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note LONGTEXT)")
    with mysql(config) as db, db.cursor() as cursor:
        for start in range(0, megabytes * 16, 16):
            cursor.executemany(
                "INSERT INTO t VALUES (%s, %s)", [(start + i, os.urandom(32 * 1024).hex()) for i in range(16)]
            )


def count(config: dict) -> int:
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM t")
        return cursor.fetchone()[0]


def test_a_worker_killed_mid_snapshot_leaves_it_failed_and_the_instance_running(api, broker, queued_for_real, tmp_path):
    worker = Worker(tmp_path / "worker.log", env=RECOVERY)
    worker.start()
    try:
        pk = create(api, "mysql", disk="512mb")["id"]
        config = config_of(api, "mysql", pk)
        fill(config, 48)
        files_before = sorted(settings.STOCKROOM_SNAPSHOT_DIR.rglob("*"))
        sid = api.post(f"/api/storage/mysql/instances/{pk}/snapshots").json()["id"]
        wait_until(lambda: helper_running(pk, ("mariabackup",)), 30, "mariabackup to run")
    finally:  # a worker left running would take later tests' jobs from their broker
        worker.kill()

    worker = Worker(tmp_path / "worker2.log", beat=True, env=RECOVERY)
    worker.start()
    try:
        wait_until(lambda: Snapshot.objects.get(pk=sid).status == "failed", 60, "the snapshot to be marked failed")
        snapshot = api.get(f"/api/storage/mysql/snapshots/{sid}").json()
        assert snapshot["status_message"] == "The worker taking it stopped; no snapshot was kept."
        assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "running"
        assert count(config) == 48 * 16  # no row lost
        assert sorted(settings.STOCKROOM_SNAPSHOT_DIR.rglob("*")) == files_before  # no file left behind
        assert not helper_running(pk, ("mariabackup",))
        # The next snapshot works.
        sid = api.post(f"/api/storage/mysql/instances/{pk}/snapshots").json()["id"]
        wait_until(lambda: Snapshot.objects.get(pk=sid).status != "creating", 60, "a snapshot")
        assert Snapshot.objects.get(pk=sid).status == "ready"
    finally:
        worker.stop()


def test_a_worker_killed_mid_restore_is_finished_by_the_reconciler(api, broker, queued_for_real, tmp_path):
    worker = Worker(tmp_path / "worker.log", env=RECOVERY)
    worker.start()
    pk = create(api, "mysql", disk="512mb")["id"]
    config = config_of(api, "mysql", pk)
    fill(config, 32)
    sid = api.post(f"/api/storage/mysql/instances/{pk}/snapshots").json()["id"]
    wait_until(lambda: Snapshot.objects.get(pk=sid).status != "creating", 60, "the snapshot")
    execute(config, "DELETE FROM t WHERE id < 100", "INSERT INTO t VALUES (100000, 'after')")

    assert api.post(f"/api/storage/mysql/instances/{pk}/restore", {"snapshot": sid}, format="json").status_code == 202
    wait_until(lambda: helper_running(pk, ("mbstream", "mariabackup")), 30, "the restore to run")
    worker.kill()
    assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "restoring"

    worker = Worker(tmp_path / "worker2.log", beat=True, env=RECOVERY)
    worker.start()
    try:
        done = wait_for_status(api, "mysql", pk, "running", "unhealthy", "failed", timeout=90)
        assert done["status"] == "running", done["status_message"]
        assert done["status_message"].startswith(f"Restored snapshot {sid} ")
        # Exactly the snapshot's rows: nothing of the writes after it, nothing lost or mixed.
        assert count(config) == 32 * 16
        with mysql(config) as db, db.cursor() as cursor:
            cursor.execute("SELECT MIN(id), MAX(id) FROM t")
            assert cursor.fetchone() == (0, 32 * 16 - 1)
    finally:
        worker.stop()


def test_a_snapshot_reads_only_what_the_instance_may_read_and_leaves_no_account(api):
    """The tenant's uid plants a symlink to a file only root may read, where mariabackup copies
    files from; the snapshot runs as that uid, so it cannot follow it there."""
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY) ENGINE=Aria", "INSERT INTO t VALUES (1)")
    secret = Path("/etc/shadow").read_bytes().splitlines()[0]
    data = server_dir("mysql", pk) / "data" / "app"
    owner = data.stat()
    for name in ("stolen.frm", "stolen.MYD", "stolen.MAI"):
        (data / name).symlink_to("/etc/shadow")
        os.lchown(data / name, owner.st_uid, owner.st_gid)
    response = api.post(f"/api/storage/mysql/instances/{pk}/snapshots")
    snapshot = Snapshot.objects.get(pk=response.json()["id"])
    # As the instance's uid, mariabackup cannot open the file: the snapshot fails and says why
    # (as root it would have copied the file into the snapshot, and the tenant restored it).
    assert (snapshot.status, snapshot.file) == ("failed", "")
    assert "Failed to copy file ./app/stolen" in snapshot.status_message
    assert all(secret not in path.read_bytes() for path in settings.STOCKROOM_SNAPSHOT_DIR.rglob("*") if path.is_file())
    assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "running"
    row = Snapshot.objects.get(pk=snapshot.pk).instance
    with pymysql.connect(
        unix_socket=str(server_dir("mysql", pk) / "server.sock"), user="root", password=row.admin_password
    ) as db:
        with db.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM mysql.global_priv WHERE User = 'stockroom_backup'")
            assert cursor.fetchone() == (0,)


def test_a_restore_cut_short_between_its_two_renames_is_undone_by_the_next(api):
    """The worker died just after moving the old data aside. The next restore puts it back before
    anything else, so even when that restore fails too, the server starts with its whole old data."""
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'kept')")
    row = Instance.objects.get(pk=pk)
    backend = get_backend(row.backend)
    backend.stop(row)
    server = server_dir("mysql", pk)
    (server / "data").rename(server / "data.old")
    with pytest.raises(BackendError, match="mbstream failed"):
        backend.restore(row, io.BytesIO(b"not a snapshot"))
    backend.start(row)
    assert rows(config) == [[1, "kept"]]
    assert sorted(path.name for path in server.iterdir() if path.name.startswith("data")) == ["data"]


def test_a_snapshot_larger_than_the_instances_disk_is_cut_off(api):
    """The tenant makes a table file sparse and far larger than its disk (as its uid may): the copy
    stops at the disk's size, fails and says why, and nothing of it stays."""
    instance = create(api, "mysql", disk="256mb")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE big (id INT) ENGINE=MyISAM", "INSERT INTO big VALUES (1)")
    os.truncate(server_dir("mysql", pk) / "data" / "app" / "big.MYD", 512 * 1024 * 1024)
    before = {path for path in settings.STOCKROOM_SNAPSHOT_DIR.rglob("*") if path.is_file()}
    response = api.post(f"/api/storage/mysql/instances/{pk}/snapshots")
    snapshot = api.get(f"/api/storage/mysql/snapshots/{response.json()['id']}").json()
    assert snapshot["status"] == "failed"
    assert snapshot["status_message"] == (
        "The snapshot failed: The copy passed the instance's disk size (256 MiB); it cannot be its data."
    )
    assert {path for path in settings.STOCKROOM_SNAPSHOT_DIR.rglob("*") if path.is_file()} == before
    assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "running"
    assert not [
        pid
        for pid in processes_under(instance_dir("mysql", pk))
        if "mariabackup" in Path(f"/proc/{pid}/cmdline").read_text()
    ]


def test_a_restore_follows_no_symlink_the_tenant_put_in_place_of_a_server_folder(api, tmp_path):
    """Root re-owning the server's folders after a restore would follow a symlink the instance's
    uid put there, and take a folder of the host's from everyone."""
    instance = create(api, "mysql")
    pk = instance["id"]
    snapshot = snapshot_of(api, "mysql", pk)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    server = server_dir("mysql", pk)
    owner = server.joinpath("tmp").stat()
    server.joinpath("tmp").rename(server / "tmp.aside")
    server.joinpath("tmp").symlink_to(victim)
    os.lchown(server / "tmp", owner.st_uid, owner.st_gid)
    restore(api, "mysql", pk, snapshot["id"])
    assert (stat.S_IMODE(victim.stat().st_mode), victim.stat().st_uid) == (0o755, 0)


def root_of(pk: int) -> pymysql.Connection:
    """The portal's root, over the instance's Unix socket."""
    password = Instance.objects.get(pk=pk).admin_password
    return pymysql.connect(unix_socket=str(server_dir("mysql", pk) / "server.sock"), user="root", password=password)


def mariadb_sys(pk: int) -> tuple:
    with root_of(pk) as db, db.cursor() as cursor:
        cursor.execute("SHOW GRANTS FOR 'mariadb.sys'@'localhost'")
        grants = cursor.fetchall()
        cursor.execute("SELECT Priv FROM mysql.global_priv WHERE User = 'mariadb.sys'")
        return grants, cursor.fetchall()


def test_a_restored_server_puts_mariadb_sys_back_locked_and_without_rights(api):
    """Someone with grant rights unlocks mariadb.sys, gives it a password and every right, and
    snapshots the server: the server restored from that snapshot has it as mariadb-install-db
    made it, and refuses the login."""
    pk = create(api, "mysql")["id"]
    pristine = mariadb_sys(pk)
    assert '"account_locked":true' in pristine[1][0][0]
    with root_of(pk) as db, db.cursor() as cursor:
        cursor.execute("ALTER USER 'mariadb.sys'@'localhost' IDENTIFIED BY 'taken-over' ACCOUNT UNLOCK")
        cursor.execute("GRANT ALL PRIVILEGES ON *.* TO 'mariadb.sys'@'localhost' WITH GRANT OPTION")
    socket = str(server_dir("mysql", pk) / "server.sock")
    pymysql.connect(unix_socket=socket, user="mariadb.sys", password="taken-over").close()  # the attack works here
    snapshot = snapshot_of(api, "mysql", pk)

    assert restore(api, "mysql", pk, snapshot["id"])["status"] == "running"
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(unix_socket=socket, user="mariadb.sys", password="taken-over")
    assert mariadb_sys(pk) == pristine


def as_tenant(path: Path, owner: os.stat_result) -> None:
    os.lchown(path, owner.st_uid, owner.st_gid)


def test_a_redis_snapshot_reads_its_files_through_no_symlink_or_fifo_the_tenant_plants(api):
    """A Redis snapshot and its archived log are files of the server's folder, which the
    instance's uid controls. It plants, where the portal reads them, a FIFO (a reader would wait
    for ever, holding a worker) and a symlink to the ACL file (readable by the instance's group: the
    hashes would be copied); and a manifest naming a base outside the folder. None is read."""
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    redis_client(config).set("key", "value")
    data = server_dir("redis", pk) / "data"
    owner = data.stat()
    acl = instance_dir("redis", pk) / "users.acl"
    row = Instance.objects.get(pk=pk)
    backend = get_backend(row.backend)

    os.mkfifo(data / "planted")
    as_tenant(data / "planted", owner)
    (data / "linked").symlink_to(acl)
    as_tenant(data / "linked", owner)
    with backend._beside(row) as beside:
        out = io.BytesIO()
        started = time.monotonic()
        read_out(beside, data / "planted")(out)
        assert out.getvalue() == b"" and time.monotonic() - started < 5
        with pytest.raises(BackendError, match="dd failed: .*[Tt]oo many levels of symbolic links"):
            read_out(beside, data / "linked")(out)
        assert out.getvalue() == b""
    # The manifest is the tenant's too: a base named outside the folder is refused, not followed.
    engine = get_engine("redis")
    with pytest.raises(BackendError, match="names no base file"):
        engine._base(redis_manifest("file ../../users.acl seq 1 type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n"))

    snapshot = snapshot_of(api, "redis", pk)  # and the real one, read the same way, has the keys
    content = stored(snapshot).read_bytes()
    assert content.startswith(b"REDIS") and b"value" in content
    assert acl.read_bytes() not in content
    for secret in (config["password"], row.admin_password):
        assert hashlib.sha256(secret.encode()).hexdigest().encode() not in content
    # The tenant cannot take the data over replication either.
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis_client(config).execute_command("SYNC")
    with pytest.raises(redis.exceptions.NoPermissionError):
        redis_client(config).execute_command("REPLCONF", "rdb-only", "1")


def test_the_redis_log_archive_takes_only_what_redis_closed_and_reads_its_notes_bounded(api):
    """The uid fills the folder where closed log files wait with empty ones (each would be a store
    file and a row, free of quota), and swaps the manifest for a symlink to an endless file, then
    for a huge one: each archiving fails with the reason and stores none of them; once they are
    gone it archives again."""
    pk = create(api, "redis")["id"]
    config = config_of(api, "redis", pk)
    snapshot_of(api, "redis", pk)  # a base: the instance's log is archived from now on
    redis_client(config).set("key", "value")
    before = set(LogFile.objects.filter(instance_id=pk).values_list("pk", flat=True))
    data = server_dir("redis", pk) / "data"
    owner = data.stat()
    held = data / "aof-archive"
    held.mkdir(exist_ok=True)
    as_tenant(held, owner)
    for n in range(1000, 1100):
        (held / f"appendonly.aof.{n}.incr.aof").touch()
        as_tenant(held / f"appendonly.aof.{n}.incr.aof", owner)
    row = Instance.objects.get(pk=pk)
    with get_backend(row.backend)._beside(row) as beside, pytest.raises(BackendError, match="closed log files wait"):
        get_engine("redis").archive_logs(row, beside, logs.Archive(row))
    assert set(LogFile.objects.filter(instance_id=pk).values_list("pk", flat=True)) == before

    manifest = data / "appendonlydir" / "appendonly.aof.manifest"
    real = manifest.read_bytes()
    manifest.unlink()
    manifest.symlink_to("/dev/zero")
    with get_backend(row.backend)._beside(row) as beside, pytest.raises(BackendError, match="symbolic links"):
        get_engine("redis").archive_logs(row, beside, logs.Archive(row))
    manifest.unlink()
    with manifest.open("wb") as endless:  # sparse: far more than a worker should hold in memory
        endless.truncate(1 << 30)
    as_tenant(manifest, owner)
    started = time.monotonic()
    with get_backend(row.backend)._beside(row) as beside, pytest.raises(BackendError, match="longer than"):
        get_engine("redis").archive_logs(row, beside, logs.Archive(row))
    assert time.monotonic() - started < 10
    manifest.unlink()
    manifest.write_bytes(real)
    as_tenant(manifest, owner)

    for n in range(1000, 1100):
        (held / f"appendonly.aof.{n}.incr.aof").unlink()
    logs.archive(pk)
    # With the file the refused pass closed, held since: nothing written was lost.
    new = LogFile.objects.filter(instance_id=pk).exclude(pk__in=before)
    assert len(new) == 2 and b"value" in b"".join(store.storage().open(log.file).read() for log in new)


def test_helpers_count_toward_the_instance_limits_and_end_at_their_deadline(api):
    """A helper runs as the instance's uid, which may ptrace it and make it run anything: what it
    runs is inside the instance's cgroup (it cannot start more processes than the pids limit), and
    it ends at the helper's deadline with whatever it started."""
    pk = create(api, "redis", disk="64mb")["id"]
    row = Instance.objects.get(pk=pk)
    backend = get_backend(row.backend)
    assert backend.no_cgroups is None
    uid = backend.user(row).uid
    with backend._beside(row) as beside:
        # 60 s and the disk at 20 MiB/s, well within the task's time limit.
        assert 62 < beside.deadline - time.monotonic() <= 63.2
        out = io.BytesIO()
        beside.run(["cat", "/proc/self/cgroup"], stdout=out)
        groups = dict(line.split(":", 2)[1:] for line in out.getvalue().decode().splitlines())
        for controller in ("memory", "pids"):  # v1 hierarchies, else the v2 one ("0::<path>")
            path = next((p for names, p in groups.items() if controller in names.split(",")), groups[""])
            assert path.endswith(f"/redis-{pk}"), (controller, path)

        with pytest.raises(BackendError, match="sh failed: .*fork"):
            beside.run(["sh", "-c", "for i in $(seq 100); do sleep 30 & done; wait"])
        wait_until(lambda: not left(uid, "sleep"), 10, "the helper's processes to end")

        started = time.monotonic()
        with pytest.raises(BackendError, match=r"sh failed: it took more than 1 s and was stopped"):
            dataclasses.replace(beside, deadline=time.monotonic() + 1).run(["sh", "-c", "sleep 60 & sleep 60"])
        assert time.monotonic() - started < 5
    wait_until(lambda: not left(uid, "sleep"), 10, "the helpers' processes to end")

    # A worker killed while its helper runs (Celery's hard time limit, or kill -9) takes it along.
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from provisioning.backends.processes import run_beside; "
            "run_beside(['sleep', '300'], cwd=Path(sys.argv[1]), user=(int(sys.argv[2]), int(sys.argv[3])), "
            "timeout=300)",
            str(server_dir("redis", pk)),
            str(uid),
            str(backend.user(row).gid),
        ],
        cwd=settings.BASE_DIR,
    )
    wait_until(lambda: left(uid, "sleep"), 10, "the helper to start")
    worker.kill()
    worker.wait()
    wait_until(lambda: not left(uid, "sleep"), 10, "the helper to end with its worker")
    assert redis_client(config_of(api, "redis", pk)).ping()


def left(uid: int, name: str) -> list[int]:
    """The processes of `uid` named `name`, exited ones not yet reaped too (they count toward the
    pids limit until they are)."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            status = (Path(entry.path) / "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("Name") == name and fields.get("Uid", "").split()[:1] == [str(uid)]:
            found.append(int(entry.name))
    return found
