"""Point-in-time restores and clones, through the API, against real servers and real clients (local
backend): a base snapshot, then the archived binary logs or append-only incremental files replayed
up to a whole second.

Tasks run inline here (pytest.ini), so a restore is done when its request returns; the reconciler's
archiving is called directly, as its job would run it.
"""

import math
import stat
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from provisioning.backends import listeners
from provisioning.backends.local import processes_under
from provisioning.models import Instance, LogFile
from provisioning.services import DELETABLE, logs

from .conftest import Worker, instance_dir, server_dir, wait_for_status, wait_until
from .test_snapshots import RECOVERY, config_of, create, execute, helper_running, mysql, redis_client, snapshot_of

pytestmark = pytest.mark.django_db(transaction=True)

GAP = 1.2  # seconds between two writes, as the issue asks: each write in a second of its own


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api, settings):
    """The instances a test leaves are deleted through the API when it ends, as their owner would
    (without a before-delete snapshot), so that later tests find no server of theirs."""
    yield
    settings.STOCKROOM_SNAPSHOT_KEEP_DAYS = 0
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def restore_to(api, kind: str, pk: int, moment: float) -> dict:
    response = api.post(f"/api/storage/{kind}/instances/{pk}/restore", {"time": iso(moment)}, format="json")
    assert response.status_code == 202, response.content
    assert response.json()["status"] == "restoring"
    done = wait_for_status(api, kind, pk, "running", "unhealthy", "failed", timeout=120)
    assert done["status"] == "running", done["status_message"]
    return done


def archive(pk: int) -> None:
    """What the reconciler's archiving job does, now."""
    logs.archive(pk)


class Writes:
    """Writes one row (or key) every GAP seconds, noting when each was acknowledged."""

    def __init__(self, write):
        self.write = write
        self.acknowledged: list[float] = []

    def run(self, labels: list[int], *, archive_after: tuple[int, ...] = (), pk: int | None = None) -> None:
        for n, label in enumerate(labels, start=1):
            started = time.monotonic()
            self.write(label)
            self.acknowledged.append(time.time())
            if n in archive_after:
                assert pk is not None
                archive(pk)  # the log is cut here: the restore must stitch several files
            time.sleep(max(0.0, GAP - (time.monotonic() - started)))

    def second_after(self, n: int) -> float:
        """The whole second just after the n-th write (1-based) was acknowledged."""
        return float(math.floor(self.acknowledged[n - 1]) + 1)


def mysql_rows(config: dict) -> list[int]:
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT id FROM t ORDER BY id")
        return [row[0] for row in cursor.fetchall()]


def redis_keys(config: dict) -> list[int]:
    client = redis_client(config)
    try:
        return sorted(int(key[1:]) for key in client.keys("k*"))
    finally:
        client.close()


def mysql_writer(config: dict):
    def write(label: int) -> None:
        execute(config, f"INSERT INTO t (id) VALUES ({label})")

    return write


def redis_writer(config: dict):
    client = redis_client(config)

    def write(label: int) -> None:
        client.set(f"k{label}", label)

    return write


KINDS = {
    "mysql": (mysql_writer, mysql_rows, lambda config: execute(config, "CREATE TABLE t (id INT PRIMARY KEY)")),
    "redis": (redis_writer, redis_keys, lambda config: None),
}


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_restore_to_a_time_has_exactly_the_writes_before_it_and_a_later_one_too(api, kind):
    writer, read, prepare = KINDS[kind]
    instance = create(api, kind)
    pk = instance["id"]
    assert instance["recovery_window"] is None  # no base yet
    config = config_of(api, kind, pk)
    prepare(config)
    snapshot_of(api, kind, pk)
    time.sleep(1)  # the window begins with the whole second after the base was finished
    window = api.get(f"/api/storage/{kind}/instances/{pk}").json()["recovery_window"]
    assert window is not None and window["from"] <= window["to"]

    # A write every 1.2 s for 12 s, the log archived twice meanwhile (as the reconciler does).
    writes = Writes(writer(config))
    writes.run(list(range(1, 11)), archive_after=(3, 7), pk=pk)
    assert LogFile.objects.filter(instance_id=pk).count() >= 2

    done = restore_to(api, kind, pk, writes.second_after(5))
    assert read(config) == [1, 2, 3, 4, 5]
    assert done["status_message"].startswith("Restored to ")
    assert Instance.objects.get(pk=pk).timeline == 2

    # The same after the in-place restore: its new timeline's window begins after it.
    time.sleep(1)
    window = api.get(f"/api/storage/{kind}/instances/{pk}").json()["recovery_window"]
    assert window is not None and window["from"] >= iso(writes.acknowledged[-1])
    later = Writes(writer(config))
    later.run(list(range(101, 106)), archive_after=(2,), pk=pk)
    restore_to(api, kind, pk, later.second_after(3))
    assert read(config) == [1, 2, 3, 4, 5, 101, 102, 103]


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_restore_to_a_quiet_second_just_after_the_log_was_archived(api, kind):
    """The file the archiving opened has no write before the time (its first is after it): it
    adds nothing, and the restore holds exactly the writes before."""
    writer, read, prepare = KINDS[kind]
    pk = create(api, kind)["id"]
    config = config_of(api, kind, pk)
    prepare(config)
    snapshot_of(api, kind, pk)
    writes = Writes(writer(config))
    writes.run([1, 2, 3, 4, 5], archive_after=(3,), pk=pk)
    restore_to(api, kind, pk, writes.second_after(3))
    assert read(config) == [1, 2, 3]


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_clone_to_a_time_has_exactly_the_writes_before_it(api, kind):
    writer, read, prepare = KINDS[kind]
    pk = create(api, kind)["id"]
    config = config_of(api, kind, pk)
    prepare(config)
    snapshot_of(api, kind, pk)
    writes = Writes(writer(config))
    writes.run(list(range(1, 7)), archive_after=(2,), pk=pk)

    response = api.post(
        f"/api/storage/{kind}/instances", {"from_instance": pk, "time": iso(writes.second_after(4))}, format="json"
    )
    assert response.status_code == 202, response.content
    clone = wait_for_status(api, kind, response.json()["id"], "running", "failed", timeout=120)
    assert clone["status"] == "running", clone["status_message"]
    assert read(config_of(api, kind, clone["id"])) == [1, 2, 3, 4]
    assert read(config) == [1, 2, 3, 4, 5, 6]  # the source is untouched


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_time_outside_the_window_is_refused_naming_it(api, kind):
    pk = create(api, kind)["id"]
    response = api.post(f"/api/storage/{kind}/instances/{pk}/restore", {"time": iso(time.time())}, format="json")
    assert response.status_code == 400
    assert "no recovery window yet" in response.json()["time"][0]

    snapshot_of(api, kind, pk)
    time.sleep(1)
    window = api.get(f"/api/storage/{kind}/instances/{pk}").json()["recovery_window"]
    for moment in (time.time() - 3600, time.time() + 3600):
        response = api.post(f"/api/storage/{kind}/instances/{pk}/restore", {"time": iso(moment)}, format="json")
        assert response.status_code == 400, response.content
        message = response.json()["time"][0]
        assert "outside" in message and window["from"] in message
        clone = api.post(f"/api/storage/{kind}/instances", {"from_instance": pk, "time": iso(moment)}, format="json")
        assert clone.status_code == 400, clone.content
    assert api.get(f"/api/storage/{kind}/instances/{pk}").json()["status"] == "running"


# What runs beside the server during a point-in-time restore, and what a cut-short one may leave.
RESTORE_HELPERS = {
    "mysql": ("mbstream", "mariabackup", "mariadb-binlog"),
    "redis": ("tee", "redis-check-aof"),
}
LEFTOVERS = {
    "mysql": ("data.restoring", "data.old", "tmp/replay"),
    "redis": ("data/appendonlydir.restoring", "data/appendonlydir.old"),
}


def fill_after(kind: str, config: dict) -> None:
    """Writes big enough that the restore takes a moment, all after the time restored to."""
    if kind == "mysql":
        execute(config, "INSERT INTO t SELECT id + 1000, note FROM t", "INSERT INTO t SELECT id + 2000, note FROM t")
        return
    client = redis_client(config)
    try:
        for n in range(1000, 1150):
            client.set(f"big{n}", b"x" * 1_000_000)
    finally:
        client.close()


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_worker_killed_mid_point_in_time_restore_is_finished_by_the_reconciler(
    api, broker, queued_for_real, tmp_path, kind
):
    worker = Worker(tmp_path / "worker.log", env=RECOVERY)
    worker.start()
    try:
        pk = create(api, kind, disk="512mb", **({"maxmemory": "256mb"} if kind == "redis" else {}))["id"]
        config = config_of(api, kind, pk)
        if kind == "mysql":
            execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note LONGTEXT)")
            write = lambda label: execute(config, f"INSERT INTO t VALUES ({label}, REPEAT('x', 1000000))")  # noqa: E731
        else:
            write = redis_writer(config)
        sid = api.post(f"/api/storage/{kind}/instances/{pk}/snapshots").json()["id"]
        wait_until(lambda: Instance.objects.get(pk=pk).snapshots.filter(pk=sid, status="ready").exists(), 60, "base")
        writes = Writes(write)
        writes.run(list(range(1, 6)))
        fill_after(kind, config)
        until = writes.second_after(3)
        response = api.post(f"/api/storage/{kind}/instances/{pk}/restore", {"time": iso(until)}, format="json")
        assert response.status_code == 202, response.content
        wait_until(lambda: helper_running(pk, RESTORE_HELPERS[kind], kind=kind), 30, "it")
        time.sleep(0.1)
    finally:
        worker.kill()
    assert api.get(f"/api/storage/{kind}/instances/{pk}").json()["status"] == "restoring"

    worker = Worker(tmp_path / "worker2.log", beat=True, env=RECOVERY)
    worker.start()
    try:
        done = wait_for_status(api, kind, pk, "running", "unhealthy", "failed", timeout=120)
        assert done["status"] == "running", done["status_message"]
        assert (mysql_rows if kind == "mysql" else redis_keys)(config) == [1, 2, 3]
        # Nothing left of the first try: no helper, no second server, no staged or replay folder.
        assert not helper_running(pk, (*RESTORE_HELPERS[kind], "bash"), kind=kind)
        server = {"mysql": "mariadbd", "redis": "redis-server"}[kind]
        assert len([p for p in processes_under(instance_dir(kind, pk)) if comm(p) == server]) == 1
        assert not {name for name in LEFTOVERS[kind] if (server_dir(kind, pk) / name).exists()}
    finally:
        worker.stop()


@pytest.mark.parametrize("binlog_format", ["ROW", "MIXED"])
def test_a_mysql_replay_is_exact_with_row_and_mixed_formats(api, binlog_format):
    """Values the server chose when it wrote them (UUID(), RAND()) come back as they were, not
    chosen again: both formats log such statements as rows."""
    pk = create(api, "mysql", binlog_format=binlog_format)["id"]
    config = config_of(api, "mysql", pk)
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note VARCHAR(64), score DOUBLE)")
    snapshot_of(api, "mysql", pk)
    writes = Writes(lambda label: execute(config, f"INSERT INTO t VALUES ({label}, UUID(), RAND())"))
    writes.run([1, 2, 3, 4])
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT * FROM t WHERE id <= 3 ORDER BY id")
        before = cursor.fetchall()

    restore_to(api, "mysql", pk, writes.second_after(3))
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT * FROM t ORDER BY id")
        assert cursor.fetchall() == before


def tcp_listeners() -> set[int]:
    """Inodes of every listening TCP socket on the host (state 0A in /proc/net/tcp and tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":
                inodes.add(int(fields[9]))
    return inodes


def test_the_replay_server_has_no_network_and_only_the_instances_uid_reaches_it(api):
    """The private server a MySQL restore to a time replays with (without grant tables) listens on
    no TCP port, runs as the instance's uid, and its socket is in a folder only that uid may open."""
    pk = create(api, "mysql")["id"]
    config = config_of(api, "mysql", pk)
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY)")
    snapshot_of(api, "mysql", pk)
    writes = Writes(mysql_writer(config))
    writes.run([1, 2, 3])
    uid = server_dir("mysql", pk).stat().st_uid
    seen: dict = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set() and not seen:
            for pid in processes_under(instance_dir("mysql", pk)):
                try:
                    argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
                except OSError:
                    continue
                if b"--skip-grant-tables" in argv:
                    time.sleep(0.2)  # listening by now, if it ever does
                    socket = next(a for a in argv if a.startswith(b"--socket=")).split(b"=", 1)[1].decode()
                    folder = Path(socket).parent.stat()
                    seen.update(
                        argv=argv,
                        uids=listeners.owners([pid]),
                        tcp=listeners.sockets_held_by([pid]) & tcp_listeners(),
                        folder=(folder.st_uid, stat.S_IMODE(folder.st_mode)),
                    )
                    break
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        restore_to(api, "mysql", pk, writes.second_after(2))
    finally:
        done.set()
        watcher.join()
    assert mysql_rows(config) == [1, 2]
    assert seen, "the replay server was never seen"
    assert b"--skip-networking" in seen["argv"]
    assert seen["tcp"] == set()
    assert seen["uids"] == {uid} and uid != 0
    assert seen["folder"] == (uid, 0o700)
