"""Export and verify of snapshots against real servers (local backend): a download loads into a
plain server of its kind with the same rows and keys, and a verify restores a snapshot into a
throwaway server, as a uid of its own, and catches one damaged on disk.

Tasks run inline here (pytest.ini), so a verify is done when its request returns.
"""

import gzip
import io
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql
import pytest
import redis
from django.conf import settings

from devtools.stack import free_port
from provisioning.backends import local
from provisioning.backends.base import get_backend
from provisioning.backends.processes import processes
from provisioning.models import Instance, Snapshot
from provisioning.services import DELETABLE, store

from .conftest import wait_for_status, wait_until
from .test_snapshots import config_of, create, execute, redis_client, root_of, rows, snapshot_of, stored

pytestmark = pytest.mark.django_db(transaction=True)

# Plain servers of the tests' own, on the last ports of the range (instances take the first ones).
PLAIN_PORTS = range(settings.STOCKROOM_PORT_RANGE[1] - 20, settings.STOCKROOM_PORT_RANGE[1] + 1)


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api, settings):
    """The instances a test leaves are deleted through the API when it ends (without a
    before-delete snapshot), so that later tests find no server of theirs."""
    yield
    settings.STOCKROOM_SNAPSHOT_KEEP_DAYS = 0
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def download(api, kind: str, sid: int) -> tuple[str, bytes]:
    response = api.get(f"/api/storage/{kind}/snapshots/{sid}/download")
    assert response.status_code == 200, response.content
    assert response.streaming
    return response["Content-Disposition"], b"".join(response.streaming_content)


def verify(api, kind: str, sid: int) -> dict:
    response = api.post(f"/api/storage/{kind}/snapshots/{sid}/verify")
    assert response.status_code == 202, response.content
    return api.get(f"/api/storage/{kind}/snapshots/{sid}").json()


@contextmanager
def running(argv: list[str], *, ready, log: Path) -> Iterator[subprocess.Popen]:
    """A server of the test's own, stopped by its PID at the end."""
    with open(log, "ab") as out:
        server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: server.poll() is None and ready(), 60, f"{argv[0]} to answer ({log.read_text()[-300:]})")
        yield server
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def answers(connect) -> bool:
    try:
        connect()
    except Exception:  # noqa: BLE001 - not yet
        return False
    return True


@contextmanager
def plain_mariadbd(folder: Path) -> Iterator[dict]:
    """A plain MariaDB server, as mariadb-install-db makes it, on 127.0.0.1; root over its socket."""
    data, socket = folder / "data", folder / "plain.sock"
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db"],
        check=True,
        capture_output=True,
    )
    port = free_port(PLAIN_PORTS)
    argv = [
        "mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={socket}", f"--port={port}",
        "--bind-address=127.0.0.1", "--user=root", f"--pid-file={folder / 'plain.pid'}", "--skip-log-bin",
    ]  # fmt: skip
    root = {"unix_socket": str(socket), "user": "root", "autocommit": True}
    with running(argv, ready=lambda: answers(lambda: pymysql.connect(**root).close()), log=folder / "plain.log"):
        yield root


def test_a_downloaded_mysql_dump_loads_into_a_plain_mariadbd_with_its_rows_view_trigger_and_routine(api, tmp_path):
    instance = create(api, "mysql", name="shop")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(
        config,
        "CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(40), note TEXT) CHARACTER SET utf8mb4",
        "INSERT INTO t VALUES (1, 'one', 'DEFINER=`app`@`%` stays in a row'), (2, 'zwei – ü', NULL), (3, 'three', '')",
        "CREATE TABLE audit (id INT)",
        "CREATE VIEW named AS SELECT id, name FROM t WHERE name <> ''",
    )
    # With binary logging on, a trigger or routine needs SUPER (or log_bin_trust_function_creators):
    # the portal's root makes them, as the tenant's own.
    with root_of(pk) as db, db.cursor() as cursor:
        cursor.execute("USE app")
        cursor.execute(
            "CREATE DEFINER = 'app'@'%' TRIGGER t_audit AFTER INSERT ON t "
            "FOR EACH ROW INSERT INTO audit VALUES (NEW.id)"
        )
        cursor.execute("CREATE DEFINER = 'app'@'%' PROCEDURE how_many(OUT n INT) SELECT COUNT(*) INTO n FROM t")
    expected = rows(config)
    # Its instance is gone, as snapshots outlive instances: the one the delete took is exported.
    assert api.delete(f"/api/storage/mysql/instances/{pk}").status_code == 202
    wait_for_status(api, "mysql", pk, "gone")
    kept = Snapshot.objects.get(instance_id=pk, trigger="before-delete")

    disposition, body = download(api, "mysql", kept.pk)
    assert disposition == f'attachment; filename="shop-snapshot-{kept.pk}.sql.gz"'
    dump = gzip.decompress(body)
    assert b"DEFINER=`app`@`%` stays in a row" in dump  # rows are never changed
    assert dump.count(b"DEFINER=`app`") == 1  # the view's, the trigger's and the routine's are gone
    with plain_mariadbd(tmp_path) as root:
        with pymysql.connect(**root) as db, db.cursor() as cursor:
            cursor.execute("CREATE DATABASE restored")
        subprocess.run(
            ["mariadb", "--no-defaults", f"--socket={root['unix_socket']}", "-uroot", "restored"],
            input=dump,
            check=True,
            capture_output=True,
        )
        with pymysql.connect(**root, database="restored") as db, db.cursor() as cursor:
            cursor.execute("SELECT * FROM t ORDER BY id")
            assert [list(row) for row in cursor.fetchall()] == expected
            cursor.execute("SELECT id, name FROM named ORDER BY id")
            assert [row[0] for row in cursor.fetchall()] == [1, 2, 3]
            cursor.execute("INSERT INTO t VALUES (4, 'four', NULL)")
            cursor.execute("SELECT id FROM audit")
            assert [row[0] for row in cursor.fetchall()] == [4]  # the trigger came along, and fires
            cursor.execute("CALL how_many(@n)")
            cursor.execute("SELECT @n")
            assert cursor.fetchone() == (4,)


def test_a_downloaded_rdb_loads_into_a_plain_redis_server_with_its_keys(api, tmp_path):
    instance = create(api, "redis", name="cache")
    client = redis_client(config_of(api, "redis", instance["id"]))
    client.set("plain", "value")
    client.hset("hash", mapping={"a": "1", "b": "2"})
    client.rpush("list", "x", "y", "z")
    client.sadd("set", "p", "q")
    client.zadd("zset", {"low": 1, "high": 2})
    client.set("expiring", "soon", ex=3600)
    snapshot = snapshot_of(api, "redis", instance["id"])

    disposition, body = download(api, "redis", snapshot["id"])
    assert disposition == f'attachment; filename="cache-snapshot-{snapshot["id"]}.rdb"'
    assert body == stored(snapshot).read_bytes()
    (tmp_path / "dump.rdb").write_bytes(body)
    port = free_port(PLAIN_PORTS)
    plain = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
    argv = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
        "--dbfilename", "dump.rdb", "--appendonly", "no", "--save", "",
    ]  # fmt: skip
    with running(argv, ready=lambda: answers(plain.ping), log=tmp_path / "plain.log"):
        assert sorted(plain.keys()) == sorted(client.keys())
        assert plain.get("plain") == "value"
        assert plain.hgetall("hash") == {"a": "1", "b": "2"}
        assert plain.lrange("list", 0, -1) == ["x", "y", "z"]
        assert plain.smembers("set") == {"p", "q"}
        assert plain.zrange("zset", 0, -1, withscores=True) == [("low", 1.0), ("high", 2.0)]
        assert 0 < plain.ttl("expiring") <= 3600


def scratch_users(monkeypatch) -> list:
    """The users the local backend's helpers run as, from now on."""
    seen = []
    run_beside = local.processes.run_beside

    def recording(argv, **kwargs):
        seen.append(kwargs["user"])
        return run_beside(argv, **kwargs)

    monkeypatch.setattr(local.processes, "run_beside", recording)
    return seen


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_verify_restores_into_a_throwaway_server_as_a_uid_of_its_own_and_catches_a_damaged_file(
    api, outsider, kind, monkeypatch
):
    instance = create(api, kind)
    config = config_of(api, kind, instance["id"])
    if kind == "mysql":
        execute(
            config,
            "CREATE TABLE t (id INT PRIMARY KEY)",
            "CREATE TABLE u (id INT) ENGINE=Aria",
            "INSERT INTO t VALUES (1)",
            "CREATE VIEW v AS SELECT id FROM t",  # a view is not a table CHECK TABLE checks
        )
    else:
        redis_client(config).mset({"a": "1", "b": "2", "c": "3"})
    snapshot = snapshot_of(api, kind, instance["id"])
    assert outsider.post(f"/api/storage/{kind}/snapshots/{snapshot['id']}/verify").status_code == 404
    assert outsider.get(f"/api/storage/{kind}/snapshots/{snapshot['id']}/download").status_code == 404

    users = scratch_users(monkeypatch)
    passed = verify(api, kind, snapshot["id"])
    assert passed["verify_status"] == "passed", passed["verify_message"]
    assert passed["verify_message"] == (
        "Its checksum matches. CHECK TABLE found all 2 tables of app sound."
        if kind == "mysql"
        else "Its checksum matches. redis-check-rdb found it sound; a throwaway redis-server loaded its 3 keys."
    )
    assert passed["verified_at"] is not None
    # Every helper ran as the scratch uid: not root, not the instance's, not the template builder's.
    backend = get_backend("local")
    if os.geteuid() == 0:
        scratch = {(backend.uids.base - 1 - slot,) * 2 for slot in range(local.SCRATCH_SLOTS)}
        assert users and set(users) <= scratch
        uid = users[0][0]
        assert uid != backend.uids.of(instance["id"]).uid
        assert processes(uid=uid) == []  # the throwaway server is gone
    assert not any((backend.root / local.SCRATCH).glob("[0-9]*/*"))  # and so is what it left

    path = stored(snapshot)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1 :])
    failed = verify(api, kind, snapshot["id"])
    assert failed["verify_status"] == "failed"
    assert failed["verify_message"] == (
        f"Snapshot {snapshot['id']} is damaged (its checksum does not match); it cannot be restored."
    )
    refused = api.get(f"/api/storage/{kind}/snapshots/{snapshot['id']}/download")
    assert refused.status_code == 409 and "damaged" in refused.json()["detail"]


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_verify_runs_the_engines_own_check_on_what_the_checksum_cannot_catch(api, kind):
    """A copy damaged before its checksum was taken (a bad disk under the worker, say) matches it;
    the engine's own tools and the throwaway server are what catch it."""
    instance = create(api, kind)
    config = config_of(api, kind, instance["id"])
    if kind == "mysql":
        execute(config, "CREATE TABLE t (id INT PRIMARY KEY, v TEXT)", "INSERT INTO t VALUES (1, REPEAT('v', 5000))")
    else:
        redis_client(config).mset({f"key{n}": "v" * 100 for n in range(50)})
    snapshot = snapshot_of(api, kind, instance["id"])
    path = stored(snapshot)
    data = path.read_bytes()
    if kind == "mysql":  # one byte of the copy changed
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:  # cut short
        path.write_bytes(data[:-200])
    with open(path, "rb") as file:
        checksum, size = store.digest(file)
    Snapshot.objects.filter(pk=snapshot["id"]).update(checksum=checksum, size_bytes=size)
    failed = verify(api, kind, snapshot["id"])
    assert failed["verify_status"] == "failed"
    if kind == "mysql":
        assert failed["verify_message"].startswith("mbstream failed: ")
        assert "invalid checksum" in failed["verify_message"]
    else:
        assert failed["verify_message"].endswith("redis-check-rdb failed: the RDB is damaged.")


def test_check_table_catches_a_damaged_table_in_a_copy_that_unpacks(api, tmp_path):
    """A copy whose stream is whole, and whose redo log has nothing for the damaged pages (so the
    prepare does not see them): the throwaway server's CHECK TABLE is what fails it."""
    instance = create(api, "mysql")
    config = config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, v TEXT)")
    execute(config, *(f"INSERT INTO t VALUES ({n}, REPEAT('v', 2000))" for n in range(200)))
    with root_of(instance["id"]) as db, db.cursor() as cursor:  # its pages written, and a checkpoint past them
        cursor.execute("SET GLOBAL innodb_max_dirty_pages_pct = 0")
        time.sleep(3)
    snapshot = snapshot_of(api, "mysql", instance["id"])
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with open(stored(snapshot), "rb") as file:
        subprocess.run(["mbstream", "-x", "-C", str(unpacked)], stdin=file, check=True)
    table = unpacked / "app" / "t.ibd"
    data = bytearray(table.read_bytes())
    for page in range(3, len(data) // 16384):  # every data page's body, past the table's own header pages
        data[page * 16384 + 200 : page * 16384 + 400] = bytes(200)
    table.write_bytes(bytes(data))
    names = sorted(str(path.relative_to(unpacked)) for path in unpacked.rglob("*") if path.is_file())
    repacked = subprocess.run(["mbstream", "-c", *names], cwd=unpacked, check=True, capture_output=True).stdout
    stored(snapshot).write_bytes(repacked)
    checksum, size = store.digest(io.BytesIO(repacked))
    Snapshot.objects.filter(pk=snapshot["id"]).update(checksum=checksum, size_bytes=size)
    failed = verify(api, "mysql", snapshot["id"])
    assert failed["verify_status"] == "failed"
    assert failed["verify_message"] == (
        "CHECK TABLE found a problem: app.t: Table `app`.`t` is corrupted. Please drop the table and recreate.; "
        "app.t: Corrupt"
    )
    backend = get_backend("local")
    if os.geteuid() == 0:  # the throwaway server that found it is gone
        assert all(processes(uid=backend.uids.base - 1 - slot) == [] for slot in range(local.SCRATCH_SLOTS))
