"""Redis: one `redis-server` per instance, or a container in the official image's contract."""

import hashlib
import io
import time
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...options import Option, backup_options, disk_option
from ..base import Beside, Container, Endpoint, Engine, Host, Layout, LocalSetup, WriteFile, replace_folder
from .rdb import read_rdb

if TYPE_CHECKING:
    from ...models import Instance

USERNAME = "default"
ADMIN_USERNAME = "stockroom"
ACL_FILE = "users.acl"
POLICIES = (
    "noeviction",
    "allkeys-lru",
    "allkeys-lfu",
    "allkeys-random",
    "volatile-lru",
    "volatile-lfu",
    "volatile-random",
    "volatile-ttl",
)
MiB = 1024 * 1024
# What redis-server itself takes besides the data: about 12 MB RSS idle (`make bench`), and
# client buffers.
SERVER_OVERHEAD = 16 * MiB
NO_RETRY = Retry(NoBackoff(), 0)
ADMIN_TIMEOUT = 10  # seconds; an administrative command that takes longer has failed
CONFIG_DIR = PurePosixPath("/usr/local/etc/redis")  # in the official image
# Redis 7's defaults (redis.conf names none): where a save writes, and the append-only files a server
# with `appendonly yes` loads at start, ignoring any RDB beside them: a restored RDB goes in as the
# base of a new append-only file.
DUMP = "dump.rdb"
AOF_DIR = "appendonlydir"
AOF_BASE = "appendonly.aof.1.base.rdb"
AOF_MANIFEST = "appendonly.aof.manifest"
SNAPSHOT_TIMEOUT = 600  # seconds the server may take to send its data before the snapshot is given up
SYNC_READ_TIMEOUT = 30  # seconds without a byte (it sends a newline every second while it prepares)

# The tenant's ACL rule, read left to right: everything that is not @dangerous; then what
# applications and their client libraries use that Redis files under @dangerous; then, last so
# that nothing above can add them back, what opens connections to other servers, loads raw
# payloads, replicates or watches every command. CLIENT SETNAME, ID, INFO and (from Redis 7.2)
# SETINFO are @connection, not @dangerous, so `+@all` already grants them; naming SETINFO would
# make Redis 7.0, which lacks it, refuse the whole ACL file ("Unknown command"). On 7.0 it answers
# "unknown subcommand", which client libraries ignore.
TENANT_RULE = (
    "+@all",
    "-@dangerous",
    # Data and cache commands: own data only, whatever they cost.
    "+keys",
    "+flushdb",
    "+flushall",
    "+swapdb",
    "+sort",
    "+sort_ro",
    # What clients and dashboards read about the server.
    "+info",
    "+config|get",
    "+slowlog|get",
    "+slowlog|len",
    "+role",
    "+lastsave",
    # Never, whatever the categories above say: what connects to any host and port and writes
    # there (the portal's Celery broker, say),
    "-migrate",
    # loads raw serialized payloads,
    "-restore",
    "-restore-asking",
    "-function|restore",
    # debugs, loads code or replicates,
    "-debug",
    "-module",
    "-sync",
    "-psync",
    "-replconf",
    "-replicaof",
    "-slaveof",
    # or sees every client's commands.
    "-monitor",
)


def acl_password_hash(password: str) -> str:
    """The `#<sha256>` form of an ACL password: the plaintext never reaches the disk."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


class Redis(Engine):
    kind = "redis"
    label = "Redis"
    config_template = "redis.conf"
    config_name = "redis.conf"
    username = USERNAME
    local_programs = ("redis-server",)
    image = "redis:7.0"  # the major version of Debian bookworm's redis-server, which the engine is tested on
    container_port = 6379
    pids_limit = 64  # a few threads, and a child while it rewrites the append-only file
    connection_fields = {
        "host": str,
        "port": int,
        "password": str,
        "maxmemory": int,
        "maxmemory_policy": str,
        "maxclients": int,
        "appendfsync": str,
        "uri": str,
    }
    options = (
        Option(
            "maxmemory",
            "Memory limit",
            "Bytes, or a size such as '256mb' (units: b, kb, mb, gb).",
            kind="size",
            default=64 * MiB,
            min_value=1 * MiB,
            max_value=4096 * MiB,
        ),
        Option(
            "maxmemory_policy",
            "Eviction policy",
            "What Redis does when the memory limit is reached.",
            kind="choice",
            default="noeviction",
            choices=POLICIES,
        ),
        Option(
            "maxclients",
            "Maximum clients",
            "Connections accepted at once.",
            kind="int",
            default=1000,
            min_value=1,
            max_value=10000,
        ),
        Option(
            "appendfsync",
            "Append-only fsync",
            "The append-only file is always on; this sets how often it is flushed to disk.",
            kind="choice",
            default="everysec",
            choices=("always", "everysec", "no"),
        ),
        disk_option(min_value=32 * MiB),
        *backup_options(),
    )

    def memory_reservation(self, options: dict[str, Any]) -> int:
        maxmemory: int = options["maxmemory"]
        return maxmemory + SERVER_OVERHEAD

    def memory_limit(self, options: dict[str, Any]) -> int:
        # Data up to maxmemory, plus fragmentation and the copy-on-write of an AOF rewrite.
        maxmemory: int = options["maxmemory"]
        return maxmemory + maxmemory // 2 + 64 * MiB

    # Running a server ------------------------------------------------------------------

    def local_setup(self, instance: "Instance", layout: Layout, host: Host) -> LocalSetup:
        return LocalSetup(
            files={**self.local_config(instance, layout), ACL_FILE: self.acl_lines(instance, instance.password)},
            dirs=(Path(layout.data),),
        )

    def local_argv(self, host: Host, config: Path) -> list[str]:
        return [str(host.program("redis-server")), str(config)]

    def container_layout(self, *, bind_address: str, port: int) -> Layout:
        data = PurePosixPath("/data")
        return Layout(
            bind_address=bind_address,
            port=port,
            data=data,
            log="",
            pid=data / "redis.pid",
            socket=PurePosixPath("/run/redis/redis.sock"),
            files=data,
            tmp=data,
            acl=CONFIG_DIR / ACL_FILE,
        )

    def container(self, instance: "Instance", layout: Layout) -> Container:
        config = CONFIG_DIR / self.config_name
        return Container(
            files={
                self.config_name: (config, self.render_config(instance, layout)),
                ACL_FILE: (CONFIG_DIR / ACL_FILE, self.acl_lines(instance, instance.password)),
            },
            command=["redis-server", str(config)],
        )

    def acl_lines(self, instance: "Instance", password: str) -> str:
        """The user may do anything to its data but not reach outside the server or administer
        it (TENANT_RULE); the portal's own user may do everything."""
        return (
            f"user {USERNAME} on {acl_password_hash(password)} ~* &* {' '.join(TENANT_RULE)}\n"
            f"user {ADMIN_USERNAME} on {acl_password_hash(instance.admin_password)} ~* &* +@all\n"
        )

    # Administration and logins ---------------------------------------------------------

    def set_password(self, instance: "Instance", password: str, *, admin: Endpoint, write: WriteFile) -> None:
        write(ACL_FILE, self.acl_lines(instance, password))
        self.reload_acl(instance, admin)

    def reload_acl(self, instance: "Instance", admin: Endpoint) -> None:
        """Make the server read its ACL file again, as the portal's own user, and end the user's
        sessions: Redis keeps a connection logged in under the old password otherwise."""
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            client.acl_load()
            # ACL LOAD ends the sessions of every user it replaces, this one's included, just after
            # its answer: the next command goes on a connection of its own.
            client.connection_pool.disconnect()
            client.client_kill_filter(user=USERNAME)
        finally:
            client.close()

    def refuse_writes(self, instance: "Instance", refuse: bool, *, admin: Endpoint) -> None:
        # A master that must write to one replica, and has none, refuses every write command
        # (NOREPLICAS) and still answers reads; the tenant may not CONFIG SET it back.
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            client.config_set("min-replicas-to-write", 1 if refuse else 0)
        finally:
            client.close()

    # Snapshots -------------------------------------------------------------------------

    snapshot_suffix = "rdb"

    def snapshot(self, instance: "Instance", beside: Beside, out: IO[bytes]) -> None:
        # From the server itself, as a replica gets it: it forks, and the child sends the data as
        # of the fork down the portal's connection while the server serves on. No file of the
        # server's folder is read (rdb.py). ACL users live in the ACL file, never in an RDB, so
        # the copy holds no password or hash.
        read_rdb(
            beside.admin,
            username=ADMIN_USERNAME,
            password=instance.admin_password,
            out=out,
            timeout=SYNC_READ_TIMEOUT,
            deadline=time.monotonic() + SNAPSHOT_TIMEOUT,
        )

    def restore(self, instance: "Instance", beside: Beside, snapshot: IO[bytes]) -> None:
        # A new append-only folder whose base is the snapshot's RDB, put in place of the old one.
        def fill(staged: PurePath) -> None:
            beside.run(["tee", "--", str(staged / AOF_BASE)], stdin=snapshot)
            manifest = f"file {AOF_BASE} seq 1 type b\n".encode()
            beside.run(["tee", "--", str(staged / AOF_MANIFEST)], stdin=io.BytesIO(manifest))

        replace_folder(beside, beside.layout.data / AOF_DIR, fill)
        beside.run(["rm", "-f", "--", str(beside.layout.data / DUMP)])  # ignored while the AOF is on; stale

    def check_login(self, instance: "Instance", endpoint: Endpoint, *, timeout: float) -> None:
        client = self.client(endpoint, username=instance.username, password=instance.password, timeout=timeout)
        try:
            # A read: a server whose disk is full refuses PING (MISCONF), as it refuses writes, yet
            # it serves reads. Not ECHO: a server still loading its data answers that, and nothing
            # else (LOADING), so it would count as running before it serves the data.
            client.dbsize()
        finally:
            client.close()

    @staticmethod
    def client(endpoint: Endpoint, *, username: str, password: str, timeout: float) -> redis.Redis:
        """A client of the portal's own, at the endpoint's Unix socket if it has one; it never
        tries again by itself: the caller decides whether and when."""
        where: dict[str, Any] = (
            {"unix_socket_path": endpoint.socket} if endpoint.socket else {"host": endpoint.host, "port": endpoint.port}
        )
        return redis.Redis(
            **where,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=NO_RETRY,
        )

    def connection(self, instance: "Instance") -> dict[str, Any]:
        return {
            "host": instance.host,
            "port": instance.port,
            "password": instance.password,
            # The options a client may need to know; the disk limit is only the server's business.
            **{
                option.name: instance.options[option.name]
                for option in self.options
                if option.name in self.connection_fields
            },
            "uri": f"redis://{instance.username}:{instance.password}@{instance.host}:{instance.port}/0",
        }

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        uri = connection["uri"]
        return [
            ("URI", uri),
            ("CLI", f"redis-cli -u {uri}"),
            ("Python", f'import redis\nr = redis.Redis.from_url("{uri}")'),
        ]
