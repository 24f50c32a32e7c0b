"""A tenant's server stays inside its own uid on the local backend: the attacks of issue 11 on the
host, replayed as the instance's own uid would try them. Root only (CI runs as root): only root can
give each instance a uid of its own."""

import os
import pwd
import socket
import stat
import subprocess
from contextlib import suppress
from pathlib import Path

import pymysql
import pytest
import redis
from django.conf import settings

from provisioning.backends.base import BackendError, get_backend
from provisioning.backends.disks import bytes_under
from provisioning.backends.local import processes_under
from provisioning.backends.uids import WORLD_WRITABLE, InstanceUser, Uids
from provisioning.engines import get_engine
from provisioning.engines.mysql import MySQL
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance
from provisioning.reconciler import Reconciler

from .conftest import instance_dir, server_dir, wait_for_status, wait_until

MiB = 1024 * 1024

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(os.geteuid() != 0, reason="only root can run each instance as a uid of its own"),
]


def running(api, kind: str, body: dict | None = None) -> tuple[int, dict]:
    pk = api.post(f"/api/storage/{kind}/instances", body or {}).json()["id"]
    body = wait_for_status(api, kind, pk, "running", "failed")
    assert body["status"] == "running", body["status_message"]
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def act(api, kind: str, pk: int, action: str) -> dict:
    assert api.post(f"/api/storage/{kind}/instances/{pk}/{action}").status_code == 202
    return wait_for_status(api, kind, pk, "running", "unhealthy", "stopped", "failed")


def delete(api, kind: str, pk: int) -> None:
    assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    wait_for_status(api, kind, pk, "gone")


def server_uid(kind: str, pk: int) -> int:
    (pid,) = processes_under(instance_dir(kind, pk))
    with open(f"/proc/{pid}/status") as status:
        uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    assert len(set(uids)) == 1, f"real, effective, saved and fs uids differ: {uids}"
    return int(uids[0])


def as_uid(uid: int, *argv: str | Path) -> subprocess.CompletedProcess:
    """What the instance's own uid can do (its server, taken over by a tenant, could do as much)."""
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *map(str, argv)],
        capture_output=True,
        text=True,
    )


def denied(result: subprocess.CompletedProcess) -> bool:
    return result.returncode != 0 and "Permission denied" in result.stderr


def root_secret(folder: Path) -> tuple[Path, os.stat_result]:
    """A root-owned 0600 file, as /etc/shadow is: what a planted symlink would aim at."""
    target = folder / "root-only"
    target.write_text("root's own\n")
    target.chmod(0o600)
    return target, target.stat()


def assert_untouched(target: Path, before: os.stat_result) -> None:
    after = target.stat()
    assert (after.st_uid, after.st_gid, stat.S_IMODE(after.st_mode)) == (0, 0, 0o600)
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)
    assert target.read_text() == "root's own\n"


def test_each_instance_runs_as_its_own_uid_and_no_other_can_read_its_data(api):
    redis_pk, _ = running(api, "redis")
    mysql_pk, _ = running(api, "mysql")
    redis_uid, mysql_uid = server_uid("redis", redis_pk), server_uid("mysql", mysql_pk)
    assert 0 not in (redis_uid, mysql_uid)
    assert redis_uid != mysql_uid
    backend = get_backend("local")
    assert redis_uid == backend.uids.of(redis_pk).uid and mysql_uid == backend.uids.of(mysql_pk).uid

    for kind, pk, uid in (("redis", redis_pk, redis_uid), ("mysql", mysql_pk, mysql_uid)):
        folder = instance_dir(kind, pk).stat()
        assert (folder.st_uid, folder.st_gid, stat.S_IMODE(folder.st_mode)) == (0, uid, 0o750)
        server = server_dir(kind, pk).stat()
        assert (server.st_uid, server.st_gid, stat.S_IMODE(server.st_mode)) == (uid, uid, 0o700)
        config = (instance_dir(kind, pk) / f"{'my.cnf' if kind == 'mysql' else 'redis.conf'}").stat()
        assert (config.st_uid, config.st_gid, stat.S_IMODE(config.st_mode)) == (0, uid, 0o640)
        # Everything in server/ is the instance's own.
        for path in server_dir(kind, pk).rglob("*"):
            assert path.lstat().st_uid == uid, f"{path} is not the instance's"

    # Each reads its own files, and not the other's: not even their names.
    assert as_uid(redis_uid, "cat", instance_dir("redis", redis_pk) / "users.acl").returncode == 0
    assert as_uid(mysql_uid, "ls", server_dir("mysql", mysql_pk) / "data").returncode == 0
    for uid, kind, pk in ((redis_uid, "mysql", mysql_pk), (mysql_uid, "redis", redis_pk)):
        assert denied(as_uid(uid, "ls", instance_dir(kind, pk)))
        assert denied(as_uid(uid, "ls", server_dir(kind, pk) / "data"))
    assert denied(as_uid(redis_uid, "cat", server_dir("mysql", mysql_pk) / "data" / "ibdata1"))
    assert denied(as_uid(redis_uid, "cat", instance_dir("mysql", mysql_pk) / "my.cnf"))
    assert denied(as_uid(mysql_uid, "cat", instance_dir("redis", redis_pk) / "users.acl"))
    assert denied(as_uid(mysql_uid, "cat", server_dir("redis", redis_pk) / "server.log"))
    # Nor may an instance's uid change the portal's files of its own instance.
    assert denied(
        as_uid(redis_uid, "sh", "-c", f"echo 'user x on nopass +@all' >> {instance_dir('redis', redis_pk)}/users.acl")
    )

    delete(api, "redis", redis_pk)
    delete(api, "mysql", mysql_pk)


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_symlinks_planted_by_the_instance_uid_are_not_followed(api, tmp_path, kind):
    target, before = root_secret(tmp_path)
    pk, _ = running(api, kind)
    uid = server_uid(kind, pk)
    folder, server = instance_dir(kind, pk), server_dir(kind, pk)

    # Wherever the uid can write: the log the portal used to open and chown, and (MySQL) the socket
    # the portal logs in through.
    assert as_uid(uid, "ln", "-sfn", target, server / "server.log").returncode == 0
    if kind == "mysql":
        assert as_uid(uid, "ln", "-sfn", target, server / "server.sock").returncode == 0
    # Not where the portal writes: the config folder is root's.
    for name in ("users.acl", ".users.acl.new", "my.cnf", "redis.conf", "init.sql"):
        assert denied(as_uid(uid, "ln", "-sfn", target, folder / name)), name

    body = act(api, kind, pk, "restart")
    assert body["status"] == "running", body["status_message"]
    assert stat.S_ISREG((server / "server.log").lstat().st_mode), "the server opened a log of its own"
    body = act(api, kind, pk, "rotate-password")
    assert body["status"] == "running", body["status_message"]
    assert_untouched(target, before)
    delete(api, kind, pk)
    assert_untouched(target, before)


def test_the_portal_logs_in_through_no_socket_the_instance_uid_points_elsewhere(api, tmp_path):
    """The uid swaps its MySQL socket for a symlink to another listener: the rotation, which logs
    in as the instance's root, fails without a byte sent there."""
    stranger = socket.socket(socket.AF_UNIX)
    stranger.bind(str(tmp_path / "stranger.sock"))
    stranger.listen()
    stranger.settimeout(0.5)
    pk, _ = running(api, "mysql")
    uid = server_uid("mysql", pk)
    sock = server_dir("mysql", pk) / "server.sock"
    assert as_uid(uid, "sh", "-c", f"rm {sock} && ln -s {tmp_path / 'stranger.sock'} {sock}").returncode == 0

    body = act(api, "mysql", pk, "rotate-password")
    assert body["status"] == "unhealthy"
    assert "is not the server's socket" in body["status_message"]
    with pytest.raises(TimeoutError):
        stranger.accept()
    stranger.close()
    delete(api, "mysql", pk)


def test_nothing_of_the_uid_is_left_after_delete(api):
    pk, _ = running(api, "redis")
    uid = server_uid("redis", pk)
    backend = get_backend("local")
    assert backend.uids.holder(uid) == f"{settings.STOCKROOM_PORTAL_ID} redis/{pk}\n"
    # What a taken-over server could leave outside its folder, and a process of its own.
    assert (
        as_uid(
            uid, "sh", "-c", "mkdir /tmp/left-$(id -u) && touch /tmp/left-$(id -u)/f /dev/shm/left-$(id -u)"
        ).returncode
        == 0
    )
    subprocess.run(
        ["setsid", "--fork", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "sleep", "300"],
        cwd="/",
    )

    delete(api, "redis", pk)
    assert not [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _uid_of(pid) == uid]
    owned = [
        path
        for root in (settings.STOCKROOM_INSTANCES_DIR, *WORLD_WRITABLE)
        for path in _walk(root)
        if path.lstat().st_uid == uid
    ]
    assert owned == []
    assert backend.uids.holder(uid) is None
    with pytest.raises(KeyError):
        pwd.getpwuid(uid)


def _uid_of(pid: int) -> int | None:
    """The real uid of a live process; None for one that is gone or has exited (a zombie waits
    only for its parent to collect its exit status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return None
    return None if fields["State"].strip().startswith("Z") else int(fields["Uid"].split()[0])


def _walk(root: Path, depth: int = 3):
    """What is in `root`, `depth` levels down, on its own filesystem (a /proc mounted in a chroot
    below /var/tmp lists every process's folder, zombies' too)."""
    try:
        device, entries = root.stat().st_dev, list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        yield Path(entry.path)
        if depth > 1 and entry.is_dir(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_dev == device:
            yield from _walk(Path(entry.path), depth - 1)


def test_two_portals_never_share_a_uid(tmp_path):
    ours = Uids(base=0x70000000, claims=tmp_path, portal="ours")
    theirs = Uids(base=0x70000000, claims=tmp_path, portal="theirs")
    user = ours.of(7)
    ours.claim(user, "redis/7")
    ours.claim(user, "redis/7")  # again: it is ours
    with pytest.raises(BackendError, match="held by another portal"):
        theirs.claim(user, "redis/7")
    assert not theirs.holds(user, "redis/7"), "so the other portal kills nothing that runs as it"
    with pytest.raises(BackendError, match="belongs to the account 'root'"):
        Uids(base=0, claims=tmp_path, portal="ours").claim(InstanceUser(0, 0), "redis/0")
    ours.release(user, "redis/7")
    assert ours.holder(user.uid) is None


def test_a_portal_that_is_not_root_says_instances_are_not_apart(monkeypatch):
    backend = get_backend("local")
    monkeypatch.setattr(type(backend), "confined", property(lambda self: False))
    assert "Not root: every instance runs as the portal's user" in backend.check()


# Kernel limits ---------------------------------------------------------------------------


def tenant_mysql(config: dict, read_timeout: float = 30) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        autocommit=True,
        connect_timeout=5,
        read_timeout=read_timeout,
    )


def cgroup_of(kind: str, pk: int) -> Path:
    backend = get_backend("local")
    assert backend.no_cgroups is None, backend.no_cgroups
    return backend.cgroups._path("memory", f"{kind}-{pk}")


def test_a_server_over_its_memory_limit_is_killed_healed_and_alone_in_that(api, monkeypatch):
    neighbour, neighbour_config = running(api, "redis")
    (neighbour_pid,) = processes_under(instance_dir("redis", neighbour))
    monkeypatch.setattr(MySQL, "memory_limit", lambda self, options: 200 * MiB)
    pk, config = running(api, "mysql")
    (server_pid,) = processes_under(instance_dir("mysql", pk))
    cgroup = cgroup_of("mysql", pk)
    assert server_pid in get_backend("local").cgroups.members(f"mysql-{pk}")
    limit_file = "memory.max" if (cgroup / "memory.max").exists() else "memory.limit_in_bytes"
    assert int((cgroup / limit_file).read_text()) == 200 * MiB
    with tenant_mysql(config) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE kept (v INT) ENGINE=InnoDB")
        cursor.execute("INSERT INTO kept VALUES (42)")

    # User variables: memory a session keeps, which MariaDB's per-session caps do not stop in
    # time; a few sessions take the server past its limit.
    sessions = [tenant_mysql(config) for _ in range(6)]
    with pytest.raises(pymysql.err.OperationalError):
        for number in range(8):
            for session in sessions:
                with session.cursor() as cursor:
                    cursor.execute(f"SET @v{number} = REPEAT('x', 15 * 1024 * 1024)")
    for session in sessions:
        with suppress(Exception):
            session.close()
    wait_until(lambda: not processes_under(instance_dir("mysql", pk)), 30, "the server to die")

    report = Reconciler().run_once()
    assert report.unhealthy == [pk] and report.heals == [pk]
    body = wait_for_status(api, "mysql", pk, "running", "failed")
    assert body["status"] == "running", body["status_message"]
    reasons = [event["reason"] for event in api.get(f"/api/storage/mysql/instances/{pk}/events").json()["results"]]
    assert any("ran out of memory" in reason and "200 MiB" in reason for reason in reasons), reasons
    with tenant_mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT v FROM kept")
        assert cursor.fetchall() == ((42,),)

    assert processes_under(instance_dir("redis", neighbour)) == [neighbour_pid], "the neighbour was not touched"
    client = redis.Redis.from_url(neighbour_config["uri"], retry=NO_RETRY)
    assert client.ping()
    client.close()
    assert get_backend("local").cgroups.oom_kills(f"redis-{neighbour}") == 0
    delete(api, "mysql", pk)
    assert not cgroup.exists(), "the cgroup goes with the instance"
    delete(api, "redis", neighbour)


def test_each_server_has_a_pids_limit(api):
    pk, _ = running(api, "redis")
    cgroups = get_backend("local").cgroups
    pids = cgroups._path("pids", f"redis-{pk}")
    assert int((pids / "pids.max").read_text()) == get_engine("redis").pids_limit
    (server_pid,) = processes_under(instance_dir("redis", pk))
    assert server_pid in map(int, (pids / "cgroup.procs").read_text().split())
    delete(api, "redis", pk)
    assert not pids.exists()


# Disk limits -----------------------------------------------------------------------------


def with_disk(settings, kind: str, size: int) -> dict:
    """The create body for an instance with a disk of `size` bytes: the `disk` option where the
    engine has one, and the default of every instance that names none."""
    settings.STOCKROOM_DEFAULT_DISK = size
    return {"disk": size} if any(option.name == "disk" for option in get_engine(kind).options) else {}


def set_disk_limit(settings, pk: int, size: int) -> None:
    settings.STOCKROOM_DEFAULT_DISK = size
    instance = Instance.objects.get(pk=pk)
    if "disk" in instance.options:
        Instance.objects.filter(pk=pk).update(options={**instance.options, "disk": size})


def mounts() -> dict[str, tuple[str, set[str]]]:
    """Mount point -> (filesystem type, options), as the kernel lists them."""
    found = {}
    with open("/proc/self/mounts") as table:
        for line in table:
            _source, target, fstype, options, *_ = line.split()
            found[target.replace("\\040", " ")] = (fstype, set(options.split(",")))
    return found


def status(api, kind: str, pk: int) -> dict:
    return api.get(f"/api/storage/{kind}/instances/{pk}").json()


def mysql_write(config: dict, rows: int) -> None:
    with tenant_mysql(config) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS blobs (b LONGBLOB) ENGINE=InnoDB")
        for _ in range(rows):
            cursor.execute("INSERT INTO blobs VALUES (REPEAT('x', 1024 * 1024))")


def mysql_read(config: dict) -> int:
    with tenant_mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM blobs")
        return cursor.fetchone()[0]


def redis_write(config: dict, rows: int) -> None:
    client = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
    for _ in range(rows):
        client.rpush("blobs", b"x" * MiB)
    client.close()


def redis_read(config: dict) -> int:
    client = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
    try:
        return client.llen("blobs")
    finally:
        client.close()


WRITES = {
    "mysql": (mysql_write, mysql_read, pymysql.err.OperationalError),
    "redis": (redis_write, redis_read, redis.ResponseError),
}


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_without_loop_mounts_the_reconciler_makes_an_instance_over_its_disk_limit_refuse_writes(
    api, settings, monkeypatch, kind
):
    write, read, refused = WRITES[kind]
    backend = get_backend("local")
    monkeypatch.setattr(backend, "no_disks", "loop mounts are switched off in this test")
    assert "The reconciler enforces disk limits, not the kernel: loop mounts are switched off" in backend.check()
    pk, config = running(api, kind, with_disk(settings, kind, 1024 * MiB))
    server = server_dir(kind, pk)
    assert str(server) not in mounts()
    write(config, 1)
    limit = bytes_under(server) + 4 * MiB
    set_disk_limit(settings, pk, limit)

    write(config, 8)  # past the limit: nothing stops it yet
    # On a busy disk Redis holds its AOF writes back for up to 2 s (while an fsync is slow).
    wait_until(lambda: bytes_under(server) > limit, 10, "the writes to reach the disk")
    Reconciler().run_once()
    body = status(api, kind, pk)
    assert body["status"] == "running"
    assert body["status_message"].startswith("Its disk is full") and "refuses writes" in body["status_message"]
    with pytest.raises(refused, match="read-only|NOREPLICAS"):
        write(config, 1)
    assert read(config) == 9, "reads still work"

    set_disk_limit(settings, pk, 1024 * MiB)  # as a larger disk would
    Reconciler().run_once()
    assert status(api, kind, pk)["status_message"] == "Running; its disk has room again."
    write(config, 1)
    assert read(config) == 10
    delete(api, kind, pk)


def fill_redis(config: dict) -> int:
    """Write 256 KiB values until the server refuses; returns how many it took."""
    client = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
    taken = 0
    with pytest.raises(redis.ResponseError, match="MISCONF Errors writing to the AOF file: No space left on device"):
        for number in range(400):  # 100 MiB, far past the limit
            client.set(f"key{number}", b"x" * (256 * 1024))
            taken += 1
    client.close()
    return taken


def count_redis(config: dict) -> int:
    client = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
    try:
        assert client.get("key0") == b"x" * (256 * 1024)
        return client.dbsize()
    finally:
        client.close()


def fill_mysql(config: dict) -> int:
    """Write 1 MiB rows until a write fails, or hangs (MariaDB holds a binary log write until there
    is room); returns how many it took."""
    taken = 0
    # A write held for want of room ends the session after 5 s.
    with tenant_mysql(config, read_timeout=5) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE blobs (b LONGBLOB) ENGINE=InnoDB")
        with pytest.raises(pymysql.err.OperationalError):
            for _ in range(400):
                cursor.execute("INSERT INTO blobs VALUES (REPEAT('x', 1024 * 1024))")
                taken += 1
    return taken


# The smallest disks the engines accept.
DISKS = {"redis": (32 * MiB, 256 * 1024, fill_redis, count_redis), "mysql": (256 * MiB, MiB, fill_mysql, mysql_read)}


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_writes_stop_at_the_disk_limit_and_the_status_says_so(api, settings, kind):
    size, row, fill, count = DISKS[kind]
    assert get_backend("local").no_disks is None, get_backend("local").no_disks
    pk, config = running(api, kind, with_disk(settings, kind, size))
    server, image = server_dir(kind, pk), instance_dir(kind, pk) / "disk.img"
    fstype, options = mounts()[str(server)]
    assert fstype == "ext4" and {"nosuid", "nodev", "noexec"} <= options
    assert (image.stat().st_uid, stat.S_IMODE(image.stat().st_mode), image.stat().st_size) == (0, 0o600, size)

    try:
        taken = fill(config)
        # Redis may acknowledge what it holds for an append-only file write it retries (up to 2 s
        # of writes, never written): it refuses writes once that write fails.
        assert size / 4 < taken * row < 2 * size
        assert status(api, kind, pk)["status_message"].startswith("Started")
        report = Reconciler().run_once()
        assert report.unhealthy == []
        body = status(api, kind, pk)
        assert body["status"] == "running"
        assert body["status_message"].startswith("Its disk is full (") and "writes fail" in body["status_message"]
        # It answers, so it is not restarted. (Redis may then trim the failed write from its file
        # and have a little room again: the next pass may say so.)
        assert Reconciler().run_once().unhealthy == []
        assert status(api, kind, pk)["status"] == "running"
        assert count(config) == taken, "reads still work"
    finally:  # a failure here must leave no server behind for the tests after it
        delete(api, kind, pk)
    assert str(server) not in mounts()
    assert not image.exists()
    assert str(image) not in subprocess.run(["losetup", "--all"], capture_output=True, text=True).stdout


def test_filesystems_of_the_usual_size_are_kept_ready_and_used(api, settings):
    backend = get_backend("local")
    assert backend.no_disks is None, backend.no_disks
    size = 32 * MiB  # the smallest a Redis may have
    ready = backend.disks.ready / str(size)
    first, _ = running(api, "redis", with_disk(settings, "redis", size))

    def kept_ready() -> dict[int, Path]:
        """The images of the filesystems kept ready, by inode."""
        mounted = [path for path in ready.iterdir() if os.path.ismount(path)] if ready.is_dir() else []
        return {(backend.disks.ready_images / str(size) / f"{path.name}.img").stat().st_ino: path for path in mounted}

    wait_until(lambda: len(kept_ready()) == 2, 30, "two filesystems to be ready")
    waiting = kept_ready()
    second, _ = running(api, "redis", with_disk(settings, "redis", size))
    assert (instance_dir("redis", second) / "disk.img").stat().st_ino in waiting, "it got one made ahead"
    assert str(server_dir("redis", second)) in mounts()
    wait_until(lambda: len(kept_ready()) == 2, 30, "another to be made ready")
    for pk in (first, second):
        delete(api, "redis", pk)


def test_the_health_check_says_what_the_kernel_enforces():
    detail = get_backend("local").check()
    assert "Each instance runs as a uid of its own" in detail
    assert "in a cgroup of its own with memory and pids limits (v1 memory, v1 pids" in detail or "v2 memory" in detail
    assert "Its data is a loop-mounted filesystem of its disk limit." in detail
