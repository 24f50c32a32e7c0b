"""Imports and clones from a file, through the API, against real servers (local backend).

The files come from elsewhere, as a user's would: a `mariadb-dump` of a plain `mariadbd` that has
nothing to do with the portal (root's view and trigger, DEFINER=root@localhost), an RDB saved by a
plain `redis-server`. Both are started here, on loopback ports of this run's range, and stopped by
their PIDs. Tasks run inline (pytest.ini), so an import is done when its request returns.
"""

import gzip
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile

from provisioning.models import Instance, Snapshot
from provisioning.services import DELETABLE

from .conftest import Worker, wait_for_status, wait_until
from .test_snapshots import RECOVERY, config_of, create, execute, mysql, redis_client, rows

pytestmark = pytest.mark.django_db(transaction=True)

# The last ports of this run's range: instances take the first ones.
PLAIN_PORTS = settings.STOCKROOM_PORT_RANGE[1] - 2, settings.STOCKROOM_PORT_RANGE[1] - 1


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api, settings):
    yield
    settings.STOCKROOM_SNAPSHOT_KEEP_DAYS = 0
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def _wait(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def foreign_dump() -> Iterator[bytes]:
    """`mariadb-dump --routines --triggers shop` of a plain mariadbd, whose view and trigger root made."""
    folder = Path(tempfile.mkdtemp(prefix="plain-mariadbd-"))
    data, socket = folder / "data", folder / "s"
    subprocess.run(
        ["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root", "--skip-test-db",
         "--auth-root-authentication-method=socket"],
        check=True, capture_output=True,
    )  # fmt: skip
    server = subprocess.Popen(
        ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={socket}", "--user=root",
         "--bind-address=127.0.0.1", f"--port={PLAIN_PORTS[0]}", f"--log-error={folder / 'err.log'}"],
    )  # fmt: skip
    try:
        client = ["mariadb", "--no-defaults", f"--socket={socket}", "-uroot"]
        _wait(lambda: subprocess.run([*client, "-e", "SELECT 1"], capture_output=True).returncode == 0, "mariadbd")
        setup = """
            CREATE DATABASE shop;
            USE shop;
            CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(40), price INT) ENGINE=InnoDB;
            CREATE TABLE audit (item INT, note VARCHAR(80));
            INSERT INTO items VALUES (1, 'tea; with a semicolon', 3), (2, 'it''s -- not a comment', 5);
            CREATE VIEW cheap AS SELECT id, name FROM items WHERE price < 4;
            DELIMITER ;;
            CREATE TRIGGER noted AFTER INSERT ON items FOR EACH ROW BEGIN
              INSERT INTO audit VALUES (NEW.id, CONCAT('added ', NEW.name));
            END;;
            DELIMITER ;
        """
        subprocess.run([*client], input=setup.encode(), check=True, capture_output=True)
        dumped = subprocess.run(
            ["mariadb-dump", "--no-defaults", f"--socket={socket}", "-uroot", "--single-transaction", "--routines",
             "--triggers", "shop"],
            check=True, capture_output=True,
        ).stdout  # fmt: skip
    finally:
        _stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    assert b"DEFINER=`root`@`localhost`" in dumped  # as dumps from elsewhere are
    yield dumped


@pytest.fixture(scope="module")
def foreign_rdb() -> Iterator[bytes]:
    """The dump.rdb a plain redis-server saved."""
    folder = Path(tempfile.mkdtemp(prefix="plain-redis-"))
    server = subprocess.Popen(
        ["redis-server", "--port", str(PLAIN_PORTS[1]), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=PLAIN_PORTS[1])
        _wait(lambda: _pings(client), "redis-server")
        client.set("greeting", "hello")
        client.rpush("queue", "a", "b", "c")
        client.hset("user:1", mapping={"name": "ann", "visits": 3})
        client.set("blob", bytes(range(256)) * 1000)
        client.save()
        rdb = (folder / "dump.rdb").read_bytes()
    finally:
        _stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    yield rdb


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def import_file(api, kind: str, pk: int, name: str, content: bytes) -> dict:
    file = SimpleUploadedFile(name, content)
    response = api.post(f"/api/storage/{kind}/instances/{pk}/import", {"file": file}, format="multipart")
    assert response.status_code == 202, response.content
    return wait_for_status(api, kind, pk, "running", "unhealthy", "failed")


def imports_and_reads_back(api, kind: str, config: dict, foreign_dump: bytes, foreign_rdb: bytes) -> None:
    """The other backends' proof (test_docker_backend.py, test_swarm_backend.py): a MySQL dump or
    a Redis RDB of another server imports into the instance `config` shows, and reads back."""
    name, content = ("shop.sql", foreign_dump) if kind == "mysql" else ("dump.rdb", foreign_rdb)
    done = import_file(api, kind, config["id"], name, content)
    assert done["status"] == "running", done["status_message"]
    if kind == "mysql":
        assert rows(config, "items") == [[1, "tea; with a semicolon", 3], [2, "it's -- not a comment", 5]]
        assert tenant_rows(config, "SELECT id, name FROM cheap") == [[1, "tea; with a semicolon"]]
    else:
        client = redis_client(config)
        assert client.get("greeting") == "hello" and client.lrange("queue", 0, -1) == ["a", "b", "c"]
        assert client.hgetall("user:1") == {"name": "ann", "visits": "3"}


def tenant_rows(config: dict, query: str) -> list:
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute(query)
        return [list(row) for row in cursor.fetchall()]


@pytest.mark.parametrize("packed", [False, True], ids=["sql", "sql.gz"])
def test_a_dump_of_another_server_imports_and_its_view_and_trigger_work_as_the_tenant(api, foreign_dump, packed):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    content, name = (gzip.compress(foreign_dump), "shop.sql.gz") if packed else (foreign_dump, "shop.sql")
    done = import_file(api, "mysql", pk, name, content)
    assert done["status"] == "running", done["status_message"]
    assert done["status_message"].startswith("Imported the file; a login succeeded.")
    assert rows(config, "items") == [[1, "tea; with a semicolon", 3], [2, "it's -- not a comment", 5]]
    assert tenant_rows(config, "SELECT id, name FROM cheap") == [[1, "tea; with a semicolon"]]
    execute(config, "INSERT INTO items VALUES (3, 'jam', 2)")  # the trigger runs, as its new definer
    assert tenant_rows(config, "SELECT item, note FROM audit") == [[3, "added jam"]]
    definers = tenant_rows(
        config,
        "SELECT DEFINER FROM information_schema.VIEWS WHERE TABLE_SCHEMA = 'app' "
        "UNION ALL SELECT DEFINER FROM information_schema.TRIGGERS WHERE TRIGGER_SCHEMA = 'app'",
    )
    assert definers == [["app@%"], ["app@%"]]
    undo = Snapshot.objects.get(instance_id=pk, trigger="before-import")
    assert undo.status == "ready"
    assert not [p for p in (settings.STOCKROOM_SNAPSHOT_DIR / "imports").rglob("*") if p.is_file()]  # upload gone


def test_a_dump_runs_with_the_tenants_rights_never_the_portals(api):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    dump = b"CREATE TABLE who AS SELECT CURRENT_USER() AS account, USER() AS login;\n"
    assert import_file(api, "mysql", pk, "who.sql", dump)["status"] == "running"
    ((account, login),) = tenant_rows(config, "SELECT account, login FROM who")
    assert account == "app@%" and login.startswith("app@")


@pytest.mark.parametrize(
    ("hostile", "named"),
    [
        (b"CREATE DATABASE other;\n", "CREATE DATABASE other touches another database"),
        (b"GRANT ALL PRIVILEGES ON *.* TO 'app'@'%';\n", "GRANT changes accounts' rights"),
        (b"INSERT INTO mysql.global_priv VALUES ('%', 'x', '{}');\n", "mysql.global_priv is in another database"),
    ],
    ids=["create-database", "grant", "other-database"],
)
def test_a_dump_that_reaches_beyond_the_tenant_is_refused_naming_the_line_and_nothing_changes(
    api, foreign_dump, hostile, named
):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (7)")
    lines = foreign_dump.count(b"\n")
    done = import_file(api, "mysql", pk, "bad.sql", foreign_dump + hostile)  # after every good statement
    assert done["status"] == "running"
    assert done["status_message"].startswith(f"Import refused: Line {lines + 1}: {named}"), done["status_message"]
    assert "nothing was loaded" in done["status_message"]
    assert rows(config) == [[7]]
    assert tenant_rows(config, "SHOW TABLES") == [["t"]]  # not one table of the dump
    assert not Snapshot.objects.filter(instance_id=pk, trigger="before-import").exists()


def test_a_truncated_dump_is_refused_and_nothing_changes(api, foreign_dump):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (7)")
    cut = foreign_dump[: foreign_dump.index(b"INSERT INTO `items`") + 40]
    done = import_file(api, "mysql", pk, "cut.sql", cut)
    assert done["status"] == "running"
    assert "the file is cut short" in done["status_message"]
    assert tenant_rows(config, "SHOW TABLES") == [["t"]]
    packed = gzip.compress(foreign_dump)
    done = import_file(api, "mysql", pk, "cut.sql.gz", packed[: len(packed) // 2])
    assert "cannot be read to its end" in done["status_message"]
    assert tenant_rows(config, "SHOW TABLES") == [["t"]]


def test_a_load_the_server_refuses_part_way_puts_the_data_back(api):
    instance = create(api, "mysql")
    pk, config = instance["id"], config_of(api, "mysql", instance["id"])
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (7)")
    dump = b"INSERT INTO t VALUES (8);\nCREATE TABLE u (id INT);\nINSERT INTO nowhere VALUES (1);\n"
    done = import_file(api, "mysql", pk, "half.sql", dump)
    undo = Snapshot.objects.get(instance_id=pk, trigger="before-import")
    assert done["status"] == "running", done["status_message"]
    assert "Import failed: Line 3: the server refused it (1146" in done["status_message"]
    assert f"Snapshot {undo.pk}, taken before it, was put back" in done["status_message"]
    assert rows(config) == [[7]]
    assert tenant_rows(config, "SHOW TABLES") == [["t"]]


def test_an_rdb_from_a_plain_redis_server_imports_and_survives_a_restart(api, foreign_rdb):
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    redis_client(config).set("old", "gone after the import")
    done = import_file(api, "redis", pk, "dump.rdb", foreign_rdb)
    assert done["status"] == "running", done["status_message"]
    for _ in range(2):  # and again after a restart: the append-only file holds it, not dump.rdb
        client = redis_client(config)
        assert client.get("greeting") == "hello"
        assert client.lrange("queue", 0, -1) == ["a", "b", "c"]
        assert client.hgetall("user:1") == {"name": "ann", "visits": "3"}
        assert redis.Redis(port=config["port"], password=config["password"]).get("blob") == bytes(range(256)) * 1000
        assert client.get("old") is None
        response = api.post(f"/api/storage/redis/instances/{pk}/restart")
        assert response.status_code == 202
        assert wait_for_status(api, "redis", pk, "running", "unhealthy")["status"] == "running"


@pytest.mark.parametrize(
    ("damage", "said"),
    [
        (lambda rdb: rdb[: len(rdb) // 2], "The RDB file does not load"),
        (lambda rdb: rdb[:-4] + b"\0\0\0\0", "The RDB file does not load"),  # its checksum is wrong
        (lambda rdb: b"*1\r\n$4\r\nPING\r\n", "not an RDB file"),
    ],
    ids=["truncated", "bad-checksum", "not-rdb"],
)
def test_a_bad_rdb_is_refused_and_the_data_and_status_stay(api, foreign_rdb, damage, said):
    instance = create(api, "redis")
    pk, config = instance["id"], config_of(api, "redis", instance["id"])
    redis_client(config).set("kept", "yes")
    done = import_file(api, "redis", pk, "dump.rdb", damage(foreign_rdb))
    assert done["status"] == "running"
    assert done["status_message"].startswith("Import refused:") and said in done["status_message"]
    assert "The data is as it was." in done["status_message"]
    assert redis_client(config).get("kept") == "yes" and redis_client(config).get("greeting") is None
    events = api.get(f"/api/storage/redis/instances/{pk}/events").json()["results"]
    assert events[-1]["reason"] == done["status_message"]
    # Nothing is left of the check: no side server, no copy of the file.
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_side_server(p)]


def _is_side_server(pid: str) -> bool:
    try:
        return b"side.sock" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_clone_from_a_file_starts_with_its_data(api, foreign_dump, foreign_rdb):
    for kind, name, content in (("mysql", "shop.sql", foreign_dump), ("redis", "dump.rdb", foreign_rdb)):
        file = SimpleUploadedFile(name, content)
        response = api.post(f"/api/storage/{kind}/instances", {"file": file, "name": "seeded"}, format="multipart")
        assert response.status_code == 202, response.content
        done = wait_for_status(api, kind, response.json()["id"], "running", "failed")
        assert done["status"] == "running", done["status_message"]
        config = config_of(api, kind, done["id"])
        if kind == "mysql":
            assert [row[0] for row in rows(config, "items")] == [1, 2]
        else:
            assert redis_client(config).get("greeting") == "hello"


def test_the_size_limit_answers_413_and_outsiders_get_404(api, outsider, settings, foreign_rdb):
    instance = create(api, "redis")
    pk = instance["id"]
    settings.STOCKROOM_IMPORT_MAX_BYTES = len(foreign_rdb) - 1
    file = SimpleUploadedFile("dump.rdb", foreign_rdb)
    response = api.post(f"/api/storage/redis/instances/{pk}/import", {"file": file}, format="multipart")
    assert response.status_code == 413
    file = SimpleUploadedFile("dump.rdb", foreign_rdb)
    response = outsider.post(f"/api/storage/redis/instances/{pk}/import", {"file": file}, format="multipart")
    assert response.status_code == 404
    assert Instance.objects.get(pk=pk).status == "running"


def test_an_import_whose_worker_is_killed_mid_load_is_undone_by_the_reconciler(api, broker, queued_for_real, tmp_path):
    worker = Worker(tmp_path / "worker.log", env=RECOVERY)
    worker.start()
    pk = create(api, "mysql")["id"]
    config = config_of(api, "mysql", pk)
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY)", "INSERT INTO t VALUES (-1)")
    # Many small statements: the load takes a while, and rows appear as it goes.
    dump = b"".join(b"INSERT INTO t VALUES (%d);\n" % i for i in range(200_000))
    file = SimpleUploadedFile("slow.sql", dump)
    response = api.post(f"/api/storage/mysql/instances/{pk}/import", {"file": file}, format="multipart")
    assert response.status_code == 202, response.content
    wait_until(lambda: len(rows(config)) > 100, 120, "the load to begin")
    worker.kill()
    assert api.get(f"/api/storage/mysql/instances/{pk}").json()["status"] == "importing"
    assert 100 < len(rows(config)) <= 200_000  # cut short: part of it loaded, not all

    worker = Worker(tmp_path / "worker2.log", beat=True, env=RECOVERY)
    worker.start()
    try:
        done = wait_for_status(api, "mysql", pk, "running", "unhealthy", "failed", timeout=120)
        assert done["status"] == "running", done["status_message"]
        assert done["status_message"].startswith("The worker importing the file stopped; the import was given up.")
        assert rows(config) == [[-1]]  # the before-import snapshot, put back
        assert not [p for p in (settings.STOCKROOM_SNAPSHOT_DIR / "imports").rglob("*") if p.is_file()]
    finally:
        worker.stop()
