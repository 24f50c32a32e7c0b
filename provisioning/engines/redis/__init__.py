"""Redis: one `redis-server` per instance, or a container in the official image's contract."""

import dataclasses
import hashlib
import io
import re
import socket
import ssl
import time
from datetime import UTC, datetime
from pathlib import Path, PurePath, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...errors import BackendError, ImportRefused
from ...options import LIVE, RESTART, TLS_OFF, Option, OptionError, backup_options, disk_option, tls_option
from ..base import (
    SMALL,
    ArchivedLog,
    Beside,
    Bounded,
    Container,
    Endpoint,
    Engine,
    Host,
    Layout,
    LocalSetup,
    LogArchive,
    Replay,
    Scratch,
    WriteFile,
    ca_of,
    read_out,
    read_small,
    reading,
    replace_folder,
)

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
IMPORT_DIR = "import"  # in the data folder: an uploaded RDB and the server that loads it to check it
# An uploaded RDB is loaded by a server of its own, as the instance's uid and in its cgroup: no
# port, a socket in a 0700 folder only that uid reaches, nothing saved, every payload checked in
# full as the instance's own server checks them. The file is taken only if that server loads all
# of it. $1: the folder, which holds dump.rdb (and is the cwd).
_SIDE_LOAD = r"""
set -eu
cd -- "$1"  # short paths: a socket's may not be long
redis-server --port 0 --unixsocket side.sock --unixsocketperm 700 --dir . \
    --dbfilename dump.rdb --appendonly no --save "" --logfile side.log --sanitize-dump-payload yes \
    --enable-debug-command no --enable-module-command no &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT
tries=0
until [ "$(redis-cli -s side.sock ping 2>/dev/null)" = PONG ]; do
    if ! kill -0 "$server" 2>/dev/null; then
        grep -v '^ *$' side.log | tail -n 2 >&2 || true; exit 1
    fi
    tries=$((tries + 1)); [ "$tries" -lt 6000 ] || { echo "It took over 5 minutes to load." >&2; exit 1; }
    sleep 0.05
done
redis-cli -s side.sock shutdown nosave >/dev/null 2>&1 || true
wait "$server" || true
trap - EXIT
"""
AOF_DIR = "appendonlydir"
AOF_BASE = "appendonly.aof.1.base.rdb"
AOF_MANIFEST = "appendonly.aof.manifest"
SNAPSHOT_TIMEOUT = 600  # seconds a BGSAVE or BGREWRITEAOF may take before the snapshot is given up
# Hard links to the incremental files a rewrite closes, made before it: Redis deletes them once the
# rewrite is done, the links keep them until they are archived.
AOF_HELD = "aof-archive"
INCR = re.compile(r"appendonly\.aof\.(\d+)\.incr\.aof")
BASE = re.compile(r"appendonly\.aof\.\d+\.base\.rdb")  # only names Redis gives: never "../x"
# Links the files $3… of folder $1 into folder $2 (made if need be).
_HOLD = (
    'set -e; source=$1 held=$2; shift 2; mkdir -p -m 0700 -- "$held"; for f; do ln -f -- "$source/$f" "$held/"; done'
)
MOST_HELD = 16  # closed incremental files one archiving takes

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


KEYSPACE_CLASSES = "g$lshzxetmdnA"  # Redis 7.0's event classes; K and E say which channels
_KEYSPACE = re.compile(rf"[KE{re.escape(KEYSPACE_CLASSES)}]*")


def clean_keyspace_events(value: str) -> str:
    """The letters CONFIG SET notify-keyspace-events takes, in the order Redis reads them back
    (it answers with its own order): empty, or K and/or E with at least one class."""
    if not _KEYSPACE.fullmatch(value):
        raise OptionError(
            f"{value!r} has letters Redis does not know; use K, E and any of: {' '.join(KEYSPACE_CLASSES)}."
        )
    if value and (not set(value) & set("KE") or not set(value) - set("KE")):
        raise OptionError(f"{value!r} needs K or E (the channels) and at least one event class, such as 'Ex'.")
    return value


def _same(name: str, found: str, wanted: Any) -> bool:
    """Whether CONFIG GET's answer is the option's value, as Redis writes it back (keyspace
    events in its own order, "A" for all of its classes)."""
    if name == "notify_keyspace_events":
        return _events(found) == _events(str(wanted))
    return found == str(wanted)


def _events(letters: str) -> set[str]:
    return set(letters.replace("A", "g$lshzxetd"))


def acl_password_hash(password: str) -> str:
    """The `#<sha256>` form of an ACL password: the plaintext never reaches the disk."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


# A verify checks the RDB with redis-check-rdb, then loads it into a throwaway redis-server on a
# socket in the scratch folder $1 (no TCP, no persistence) and writes how many keys it holds (every
# database's).
_THROWAWAY = r"""
set -eu -o pipefail
folder=$1 socket=$1/server.sock log=$1/server.log
if ! redis-check-rdb "$folder/dump.rdb" >"$folder/check.txt" 2>&1; then
    grep -iE 'error|eof|invalid|wrong|unexpected' -- "$folder/check.txt" | tail -n 3 >&2 || true
    echo "redis-check-rdb failed: the RDB is damaged." >&2; exit 1
fi
redis-server --port 0 --unixsocket "$socket" --unixsocketperm 700 --dir "$folder" --dbfilename dump.rdb \
    --appendonly no --save '' --logfile "$log" --daemonize no &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" || true' EXIT
tries=0
until [ "$(redis-cli -s "$socket" ping 2>/dev/null)" = PONG ]; do
    if ! kill -0 "$server" 2>/dev/null; then
        tail -n 3 -- "$log" >&2 || true; echo "The throwaway server did not load the RDB." >&2; exit 1
    fi
    tries=$((tries + 1)); [ "$tries" -lt 2400 ] || { echo "The throwaway server did not answer." >&2; exit 1; }
    sleep 0.05
done
redis-cli -s "$socket" info keyspace | sed -n 's/.*keys=\([0-9]*\).*/\1/p' | awk '{n += $1} END {print n + 0}'
redis-cli -s "$socket" shutdown nosave >/dev/null 2>&1 || true
wait "$server" || true
trap - EXIT
"""


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
        "tls": str,
        "ca_certificate": str,
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
            apply=LIVE,
        ),
        Option(
            "maxmemory_policy",
            "Eviction policy",
            "What Redis does when the memory limit is reached.",
            kind="choice",
            default="noeviction",
            choices=POLICIES,
            apply=LIVE,
        ),
        Option(
            "maxclients",
            "Maximum clients",
            "Connections accepted at once.",
            kind="int",
            default=1000,
            min_value=1,
            max_value=10000,
            apply=LIVE,
        ),
        Option(
            "appendfsync",
            "Append-only fsync",
            "The append-only file is always on; this sets how often it is flushed to disk.",
            kind="choice",
            default="everysec",
            choices=("always", "everysec", "no"),
            apply=LIVE,
        ),
        Option(
            "timeout",
            "Idle client timeout",
            "Seconds after which an idle client connection is closed; 0 keeps them open.",
            kind="int",
            default=0,
            min_value=0,
            max_value=31536000,
            apply=LIVE,
        ),
        Option(
            "notify_keyspace_events",
            "Keyspace notifications",
            "Which events are published on keyspace channels, in Redis's letters (e.g. 'Ex' for expired "
            "keys); empty turns them off.",
            kind="text",
            default="",
            check=clean_keyspace_events,
            allowed="letters from K E g $ l s h z x e t m d n A (K or E with at least one event class), or empty",
            apply=LIVE,
        ),
        Option(
            "maxmemory_samples",
            "Eviction samples",
            "Keys sampled for each eviction: more is closer to true LRU/LFU, and slower.",
            kind="int",
            default=5,
            min_value=1,
            max_value=64,
            apply=LIVE,
        ),
        Option(
            "databases",
            "Databases",
            "How many numbered databases (SELECT 0 …) the server has.",
            kind="int",
            default=16,
            min_value=1,
            max_value=256,
            apply=RESTART,
        ),
        disk_option(min_value=32 * MiB),
        *backup_options(),
        tls_option(
            "required",
            help_text="required: the port speaks TLS only, with a certificate of the portal's CA "
            "(Redis serves TLS and plaintext on separate ports, and an instance has one).",
        ),
    )

    def memory_reservation(self, options: dict[str, Any]) -> int:
        maxmemory: int = self.with_defaults(options)["maxmemory"]
        return maxmemory + SERVER_OVERHEAD

    def memory_limit(self, options: dict[str, Any]) -> int:
        # Data up to maxmemory, plus fragmentation and the copy-on-write of an AOF rewrite.
        maxmemory: int = self.with_defaults(options)["maxmemory"]
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

    def portal_port(self, instance: "Instance", layout: Layout) -> int:
        # Redis serves TLS and plaintext on ports apart: with `tls` off, TLS on the next port, for
        # the portal alone (a backend that administers across a network keeps it free for this:
        # `BaseBackend.ports_per_instance`).
        return layout.port if self.tls(instance) != TLS_OFF else layout.port + 1

    def container(self, instance: "Instance", layout: Layout) -> Container:
        config, acl = CONFIG_DIR / self.config_name, CONFIG_DIR / ACL_FILE
        command = ["redis-server", str(config)]
        if layout.admin_from is not None:
            # The portal writes no file of this server's: its ACL is one the server itself rewrites
            # (ACL SAVE, see `set_password`), in its data, which the portal's file seeds at its first
            # start only (and after a restore, whose data has none).
            layout = dataclasses.replace(layout, acl=layout.data / ACL_FILE)
            seed = 'test -e "$1" || cp -- "$2" "$1"; shift 2; exec docker-entrypoint.sh "$@"'
            command = ["sh", "-c", seed, "seed", str(layout.acl), str(acl), *command]
        return Container(
            files={
                self.config_name: (config, self.render_config(instance, layout)),
                ACL_FILE: (acl, self.acl_lines(instance, instance.password)),
                **self.tls_container_files(instance, layout),
            },
            command=command,
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
        if write is None:  # the server's own ACL file (see `container`): it changes and saves it
            client = self.client(
                admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT
            )
            try:
                new = "+" + acl_password_hash(password).removeprefix("#")  # redis-py's form of #<hash>
                client.acl_setuser(USERNAME, enabled=True, reset_passwords=True, hashed_passwords=[new])
                client.acl_save()
                client.client_kill_filter(user=USERNAME)
            finally:
                client.close()
            return
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

    # Versions --------------------------------------------------------------------------

    version_program = "redis-server"

    def server_version(self, instance: "Instance", admin: Endpoint) -> str:
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()

    def program_version(self, output: str) -> str:
        # "Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=…"
        found = re.search(r"\bv=(\S+)", output)
        if found is None:
            raise BackendError(f"redis-server --version names no version: {output.strip()[:200]!r}")
        return found.group(1)

    live_settings = {
        "maxmemory": "maxmemory",
        "maxmemory_policy": "maxmemory-policy",
        "maxclients": "maxclients",
        "appendfsync": "appendfsync",
        "timeout": "timeout",
        "notify_keyspace_events": "notify-keyspace-events",
        "maxmemory_samples": "maxmemory-samples",
    }

    def apply_live(self, instance: "Instance", changes: dict[str, Any], *, admin: Endpoint) -> None:
        # One CONFIG SET of every pair: Redis applies all of them or none.
        names = {self.live_settings[name]: name for name in changes}
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            old = {setting: str(client.config_get(setting)[setting]) for setting in names}
            pairs = [part for name, value in changes.items() for part in (self.live_settings[name], str(value))]
            try:
                client.config_set(*pairs)
            except redis.ResponseError as exc:
                raise BackendError(f"The server refused {', '.join(changes)}: {exc}.") from None
            for setting, name in names.items():
                found = str(client.config_get(setting)[setting])
                if not _same(name, found, changes[name]):
                    client.config_set(*[part for pair in old.items() for part in pair])
                    raise BackendError(f"{name} reads back as {found!r}, not {changes[name]!r}; nothing was changed.")
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

    def client_connections(self, instance: "Instance", *, admin: Endpoint) -> int:
        # Connections logged in as the tenant's user (subscribers and monitors too); the portal's
        # own user, which asks, is another.
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            clients: list[dict[str, Any]] = client.client_list()
        finally:
            client.close()
        return sum(1 for entry in clients if entry.get("user") == USERNAME)

    # Snapshots and point-in-time recovery ----------------------------------------------
    #
    # Redis 7's append-only file is a base (an RDB) and incremental files of the writes after it,
    # each second of writes marked `#TS:<unix time>` (aof-timestamp-enabled). A BGREWRITEAOF
    # closes the current incremental file and opens the next at once, then writes a new base that
    # equals the old base plus every closed file. So a snapshot is a rewrite's new base, and the
    # log that follows it is the incremental files from the one the rewrite opened; `archive_logs`
    # is a rewrite too, which closes the current file so that it can be copied whole.

    snapshot_suffix = "rdb"
    point_in_time = True
    # A snapshot is an RDB file, which any redis-server loads: it is its own export.
    export_suffix = "rdb"
    export_is_snapshot = True

    def verify(self, snapshot: IO[bytes], scratch: Scratch, *, database: str) -> str:
        rdb = scratch.folder / "dump.rdb"
        scratch.run(["tee", "--", str(rdb)], stdin=snapshot)
        found = io.BytesIO()
        scratch.run(
            ["bash", "-c", _THROWAWAY, "throwaway", str(scratch.folder)],
            stdout=Bounded(found, SMALL, "The throwaway server said too much."),  # type: ignore[arg-type]
        )
        keys = found.getvalue().decode(errors="replace").strip()
        if not keys.isdigit():
            raise BackendError(f"The throwaway server did not count its keys: {keys[:200]!r}.")
        return f"redis-check-rdb found it sound; a throwaway redis-server loaded its {keys} keys."

    def snapshot(self, instance: "Instance", beside: Beside, out: IO[bytes], archive: LogArchive | None = None) -> str:
        # The rewrite forks: the child writes the data as of the fork while the server serves on.
        # ACL users live in the ACL file, never in an RDB, so the copy holds no password or hash.
        manifest, timestamps = self._rotate(instance, beside, archive)
        # Nothing rewrites it again meanwhile: the portal alone does, and it holds the instance.
        head = _Head(out)
        read_out(beside, beside.layout.data / AOF_DIR / self._base(manifest))(head)  # type: ignore[arg-type]
        if not head.bytes.startswith(b"REDIS"):
            raise BackendError("The server's append-only base is not an RDB file.")
        opened = [name for name, kind in manifest if kind == "i" and INCR.fullmatch(name)]
        return opened[-1] if timestamps and opened else ""

    @staticmethod
    def _base(manifest: list[tuple[str, str]]) -> str:
        """The base file the manifest names, if it is a name Redis gives (never a path elsewhere)."""
        base = next((name for name, kind in manifest if kind == "b"), "")
        if not BASE.fullmatch(base):
            raise BackendError("The server's append-only manifest names no base file.")
        return base

    def archive_logs(self, instance: "Instance", beside: Beside, archive: LogArchive) -> None:
        _, timestamps = self._rotate(instance, beside, archive)
        if not timestamps:
            raise BackendError("Its server does not time-stamp its writes yet; a restart will make it.")

    def _rotate(
        self, instance: "Instance", beside: Beside, archive: LogArchive | None
    ) -> tuple[list[tuple[str, str]], bool]:
        """Rewrite the append-only file (closing the current incremental file), put the closed files
        in `archive`; return the new manifest's (file, type) pairs, and whether writes are time-stamped."""
        data = beside.layout.data
        held = data / AOF_HELD
        if archive is not None:
            # The files the rewrite will close, held by a hard link, as the uid, in its folder.
            names = [name for name, kind in self._manifest(beside) if kind == "i" and INCR.fullmatch(name)]
            beside.run(["sh", "-c", _HOLD, "sh", str(data / AOF_DIR), str(held), *names])
        client = self.client(
            beside.admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT
        )
        try:
            timestamps = client.config_get("aof-timestamp-enabled").get("aof-timestamp-enabled") == "yes"
            before = datetime.now(UTC)  # every write before this is in a file the rewrite closes
            rewrites = int(client.info("persistence")["aof_rewrites"])
            client.bgrewriteaof()  # scheduled after a BGSAVE in progress, if any
            deadline = time.monotonic() + SNAPSHOT_TIMEOUT
            while True:
                info = client.info("persistence")
                busy = int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"])
                if int(info["aof_rewrites"]) > rewrites and not busy:
                    break
                if info["aof_last_bgrewrite_status"] != "ok" and not busy:
                    raise BackendError("The server could not rewrite its data (BGREWRITEAOF failed; disk full?).")
                if time.monotonic() > deadline:
                    raise BackendError(f"The server's BGREWRITEAOF took more than {SNAPSHOT_TIMEOUT} s.")
                time.sleep(0.02)
        finally:
            client.close()
        manifest = self._manifest(beside)
        if archive is not None:
            listing = read_small(beside, ["ls", "-1", "--", str(held)], f"The folder {AOF_HELD}")
            current = {name for name, _ in manifest}
            closed = sorted((n for n in listing.split() if INCR.fullmatch(n) and n not in current), key=_seq)
            # Redis closes one file a rewrite (a few, after failed passes): more is not its doing.
            if len(closed) > MOST_HELD:
                raise BackendError(f"{len(closed)} closed log files wait in {AOF_HELD}; Redis closes a few at most.")
            archived = archive.names()
            for name in closed:
                if name not in archived:
                    archive.save(name, read_out(beside, held / name))
                beside.run(["rm", "-f", "--", str(held / name)])
            archive.covered(before)
        return manifest, timestamps

    @staticmethod
    def _manifest(beside: Beside) -> list[tuple[str, str]]:
        """(file, type) of each line of the server's append-only manifest."""
        text = read_small(beside, reading(beside.layout.data / AOF_DIR / AOF_MANIFEST), AOF_MANIFEST)
        return _manifest(text)

    def restore(self, instance: "Instance", beside: Beside, snapshot: IO[bytes], replay: Replay | None = None) -> None:
        # A new append-only folder whose base is the snapshot's RDB, and with `replay` the archived
        # incremental files after it, each cut at the second to stop at; put in place of the old one.
        logs = _replayed(replay) if replay is not None else []

        def fill(staged: PurePath) -> None:
            beside.run(["tee", "--", str(staged / AOF_BASE)], stdin=snapshot)
            lines = [f"file {AOF_BASE} seq 1 type b"]
            # The tool keeps the writes of seconds up to the one given, and drops the rest.
            last = int(replay.until.timestamp()) - 1 if replay is not None else 0
            carried: int | None = None  # the second the writes at the head of the next file are in
            for seq, log in enumerate(logs, start=1):
                name = staged / f"appendonly.aof.{seq}.incr.aof"
                with log.open() as file:
                    head, final = _stamps(file, log.name)
                    file.seek(0)
                    begins = head if head is not None else carried
                    if begins is not None and begins > last:
                        break  # nothing in it, nor in a later file, is before the time
                    # A file whose first writes came in the second the last one ended does not
                    # stamp them again: stamp them here, so that the cut sees their second.
                    stamp = f"#TS:{carried}\r\n".encode() if head is None and carried is not None else b""
                    beside.run(["tee", "--", str(name)], stdin=io.BytesIO(stamp))
                    beside.run(["tee", "-a", "--", str(name)], stdin=file)
                carried = final if final is not None else carried
                beside.run(["redis-check-aof", "--truncate-to-timestamp", str(last), str(name)])
                lines.append(f"file {name.name} seq {seq} type i")
            manifest = "".join(f"{line}\n" for line in lines).encode()
            beside.run(["tee", "--", str(staged / AOF_MANIFEST)], stdin=io.BytesIO(manifest))

        replace_folder(beside, beside.layout.data / AOF_DIR, fill)
        beside.run(["rm", "-f", "--", str(beside.layout.data / DUMP)])  # ignored while the AOF is on; stale
        beside.run(["rm", "-rf", "--", str(beside.layout.data / AOF_HELD)])  # of the data replaced

    # Imports: an RDB file, as `redis-cli --rdb` or a server's dump.rdb. A tenant may not RESTORE,
    # and with the append-only file on a server starts from it, not from dump.rdb: so a file is
    # checked, loaded by a server of its own, then put in as a snapshot is (the append-only base).

    import_suffixes = (".rdb",)
    import_replaces_data = True

    def check_import(self, instance: "Instance", beside: Beside, upload: IO[bytes]) -> None:
        head = upload.read(9)
        upload.seek(0)
        if not (head.startswith(b"REDIS") and head[5:].isdigit()):
            raise ImportRefused("The file is not an RDB file (it does not begin with REDIS and a version).")
        folder = beside.layout.data / IMPORT_DIR
        beside.run(["rm", "-rf", "--", str(folder)])
        beside.run(["mkdir", "-m", "0700", "--", str(folder)])
        try:
            beside.run(["tee", "--", str(folder / DUMP)], stdin=upload)
            try:
                beside.run(["sh", "-c", 'redis-check-rdb "$1" >&2', "check", str(folder / DUMP)])
                beside.run(["sh", "-c", _SIDE_LOAD, "side", str(folder)])
            except BackendError as exc:
                raise ImportRefused(f"The RDB file does not load: {exc}") from None
        finally:
            beside.run(["rm", "-rf", "--", str(folder)])
            upload.seek(0)

    def check_login(self, instance: "Instance", endpoint: Endpoint, *, timeout: float) -> None:
        if endpoint.socket:
            return _socket_login(endpoint.socket, instance.username, instance.password, timeout=timeout)
        # Over TCP, as a user's client connects: with TLS under `required` (the port speaks nothing
        # else), the server's certificate checked against the CA. Its socket is always plaintext.
        tls = ca_of(instance) if self.tls(instance) != TLS_OFF else None
        client = self.client(
            endpoint, username=instance.username, password=instance.password, timeout=timeout, tls_ca=tls
        )
        try:
            # A read: a server whose disk is full refuses PING (MISCONF), as it refuses writes, yet
            # it serves reads. Not ECHO: a server still loading its data answers that, and nothing
            # else (LOADING), so it would count as running before it serves the data.
            client.dbsize()
        finally:
            client.close()

    @staticmethod
    def client(
        endpoint: Endpoint, *, username: str, password: str, timeout: float, tls_ca: str | None = None
    ) -> redis.Redis:
        """A client of the portal's own, at the endpoint's Unix socket if it has one; it never
        tries again by itself: the caller decides whether and when. With `tls_ca` (a CA's PEM), TCP
        goes over TLS, the server's certificate verified against it; not its name: the portal
        reaches the server at its bind address, and has checked that the listener is the
        instance's own (`BaseBackend.check_listener`)."""
        where: dict[str, Any] = (
            {"unix_socket_path": endpoint.socket} if endpoint.socket else {"host": endpoint.host, "port": endpoint.port}
        )
        tls_ca = tls_ca or endpoint.tls_ca
        if tls_ca and not endpoint.socket:
            where |= {
                "ssl": True,
                "ssl_ca_data": tls_ca,
                "ssl_cert_reqs": ssl.CERT_REQUIRED,
                "ssl_check_hostname": False,
            }
        return redis.Redis(
            **where,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=NO_RETRY,
            # No CLIENT SETINFO: it costs each new client a read of the package's metadata from disk
            # and each connection two more round trips (a pooled create makes two, in its request).
            driver_info=None,
        )

    def connection(self, instance: "Instance") -> dict[str, Any]:
        tls = self.tls(instance) != TLS_OFF
        scheme = "rediss" if tls else "redis"
        return {
            "host": instance.host,
            "port": instance.port,
            "password": instance.password,
            # The options a client may need to know; the disk limit is only the server's business.
            **{
                option.name: instance.options.get(option.name, option.default)
                for option in self.options
                if option.name in self.connection_fields
            },
            "ca_certificate": ca_of(instance) if tls else "",
            "uri": f"{scheme}://{instance.username}:{instance.password}@{instance.host}:{instance.port}/0",
        }

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        uri = connection["uri"]
        if connection.get("tls", TLS_OFF) == TLS_OFF:
            return [
                ("URI", uri),
                ("CLI", f"redis-cli -u {uri}"),
                ("Python", f'import redis\nr = redis.Redis.from_url("{uri}")'),
            ]
        # The CA's certificate, saved as stockroom-ca.pem (the page's Download CA).
        return [
            ("URI", uri),
            ("CLI", f"redis-cli --tls --cacert stockroom-ca.pem -u {uri}"),
            ("Python", f'import redis\nr = redis.Redis.from_url("{uri}", ssl_ca_certs="stockroom-ca.pem")'),
        ]

    def reload_tls(self, instance: "Instance", *, admin: Endpoint) -> bool:
        # Setting any tls-* parameter makes Redis load the certificate and key files again.
        client = self.client(admin, username=ADMIN_USERNAME, password=instance.admin_password, timeout=ADMIN_TIMEOUT)
        try:
            path = client.config_get("tls-cert-file").get("tls-cert-file")
            if not path:
                return False
            client.config_set("tls-cert-file", path)
        finally:
            client.close()
        return True


class _Head:
    """Writes through to `out`, keeping the first bytes written."""

    def __init__(self, out: IO[bytes]):
        self.out, self.bytes = out, b""

    def write(self, data: bytes) -> int:
        if len(self.bytes) < 16:
            self.bytes += data[: 16 - len(self.bytes)]
        return self.out.write(data)


def _manifest(text: str) -> list[tuple[str, str]]:
    """(file, type) of each line of an append-only manifest (`file <name> seq <n> type <b|h|i>`)."""
    entries = []
    for line in text.splitlines():
        words = line.split()
        fields = dict(zip(words[::2], words[1::2], strict=False))
        if "file" in fields and "type" in fields:
            entries.append((fields["file"], fields["type"]))
    return entries


def _seq(name: str) -> int:
    match = INCR.fullmatch(name)
    return int(match.group(1)) if match else -1


def _replayed(replay: Replay) -> list[ArchivedLog]:
    """The archived incremental files from the one after the base, in order, up to the last that
    may hold a write before `replay.until`: the next one's writes are all at or after it. A file
    missing in between is an error: the writes after it would be replayed without its own."""
    archived = {_seq(log.name): log for log in replay.logs if INCR.fullmatch(log.name)}
    chosen: list[ArchivedLog] = []
    seq = _seq(replay.start)
    if seq not in archived:
        raise BackendError(f"The log after the base snapshot ({replay.start}) was not archived.")
    while seq in archived:
        opened_at = archived[seq].opened_at
        if opened_at is not None and opened_at >= replay.until:
            return chosen
        chosen.append(archived[seq])
        seq += 1
    if any(later > seq for later in archived):
        raise BackendError(f"The log file appendonly.aof.{seq}.incr.aof was never archived; nothing was restored.")
    return chosen


def _stamps(file: IO[bytes], name: str) -> tuple[int | None, int | None]:
    """The second an append-only file begins with (None if it begins with a write) and its last
    second (None if it has none), read as Redis writes it: `#TS:<unix time>` lines between
    commands, whose arguments are skipped by their length (a value may hold any bytes)."""
    head = last = None
    try:
        while line := file.readline():
            if line.startswith(b"#TS:"):
                last = int(line[4:])
                head = last if head is None and file.tell() == len(line) else head
            elif line.startswith(b"*"):
                for _ in range(int(line[1:])):
                    size = file.readline()
                    if not size.startswith(b"$"):
                        raise ValueError(size[:20])
                    file.seek(int(size[1:]) + 2, io.SEEK_CUR)
            elif not line.startswith(b"#"):
                raise ValueError(line[:20])
    except ValueError as exc:
        raise BackendError(f"The archived log file {name} is not an append-only file ({exc}).") from None
    return head, last


def _resp(*words: str) -> bytes:
    """A command in RESP, the protocol's request form: an array of bulk strings."""
    encoded = [word.encode() for word in words]
    return b"*%d\r\n" % len(encoded) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in encoded)


def _socket_login(path: str, username: str, password: str, *, timeout: float) -> None:
    """The user's login over the server's Unix socket, as check_login does it at the reconciler's
    scale (a pass probes every instance): AUTH with the user's name and password, then DBSIZE, both
    sent at once, over a plain socket. The same proof as a redis-py client's (whose every new
    client reads the package's metadata from disk) for a tenth of its time: the server must accept
    the credentials and serve a read. Failures raise redis-py's exceptions, as its client would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.settimeout(timeout)
        try:
            connection.connect(path)
            connection.sendall(_resp("AUTH", username, password) + _resp("DBSIZE"))
            answer = b""
            while answer.count(b"\r\n") < 2:  # both answers are one line each
                data = connection.recv(4096)
                if not data:
                    raise redis.ConnectionError("The server closed the connection.")
                answer += data
        except TimeoutError:
            raise redis.TimeoutError(f"No answer within {timeout:g} s.") from None
        except OSError as exc:
            raise redis.ConnectionError(str(exc)) from None
    authenticated, counted = answer.split(b"\r\n")[:2]
    if authenticated != b"+OK":
        raise redis.AuthenticationError(authenticated.decode(errors="replace").lstrip("-"))
    if counted.startswith(b"-LOADING"):  # a server still loading its data answers this, and nothing else
        raise redis.BusyLoadingError(counted.decode(errors="replace").lstrip("-"))
    if not counted.startswith(b":"):
        raise redis.ResponseError(counted.decode(errors="replace").lstrip("-"))
