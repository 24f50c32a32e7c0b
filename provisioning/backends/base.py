"""The contract every backend keeps. Services call backends; backends know nothing of HTTP."""

import errno
import json
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings
from django.utils.module_loading import import_string

from ..engines import Beside, Endpoint, LogArchive, Replay, engines, get_engine
from ..errors import BackendError, ImportRefused
from ..options import describe_size
from . import listeners
from .disks import DISK_FULL

if TYPE_CHECKING:
    from ..models import Instance

__all__ = [
    "DISK_FULL",
    "BackendError",
    "BaseBackend",
    "ImportRefused",
    "Node",
    "ServerExited",
    "StrangerOnPort",
    "get_backend",
]


@dataclass(frozen=True)
class Node:
    """A host of a backend that `places` servers on many (a node of a swarm), as the portal sees it."""

    id: str
    hostname: str
    address: str  # where the portal reaches it: the address it advertises
    public_host: str  # where users connect
    state: str  # ready, down, unknown, disconnected
    availability: str  # active, pause, drain
    role: str
    labelled: bool  # carries the node label: instances may be placed on it
    memory: int  # bytes

    @property
    def usable(self) -> bool:
        return self.labelled and self.state == "ready" and self.availability == "active"

    @property
    def name(self) -> str:
        """How messages name it: its hostname and address (hosts may share a hostname)."""
        return f"{self.hostname} ({self.address})" if self.hostname else self.address


class StrangerOnPort(BackendError):
    """Something other than the instance's server listens on its port; no credentials were sent."""


class ServerExited(BackendError):
    """The server exited (or was killed) before it accepted a login."""


class BaseBackend:
    """Runs database servers for instances. Choose one with STOCKROOM_BACKENDS.

    `create` and `destroy` are called from the worker, never from a request. The service
    calls `destroy` after a failed `create`, so `create` may leave partial state behind,
    and `destroy` must clean up whatever exists and be safe to call twice.
    """

    clock = staticmethod(time.monotonic)
    poll_interval = 0.02
    # Whether `start` serves the instance on whatever `instance.port` is when it is called: the
    # service moves a stopped instance to a free port when a stranger took its own. A backend that
    # fixes the port when it creates the server leaves it False, and such a start fails instead.
    moves_ports = False
    # Whether `archive_logs` and `restore(..., replay)` work: point-in-time recovery.
    point_in_time = False
    # Whether servers go on one of many hosts, chosen by `place` when an instance is requested.
    places = False
    # Whether `set_memory_limit` changes a running server's limit. Where it cannot, the options that
    # change the limit wait for the server's restart (services/changes.py).
    changes_memory_live = True
    # Whether the portal administers servers across a network (`Layout.admin_from`): each serves
    # TLS for the portal's logins, so each has a certificate, whatever its `tls` option.
    remote_admin = False
    # How many ports each instance holds on its host: its own and the ones after it (an engine may
    # serve the portal's TLS on the next: `Engine.portal_port`).
    ports_per_instance = 1

    def __init__(self, alias: str, **options: Any):
        self.alias = alias
        self.options = options

    def create(self, instance: "Instance") -> None:
        """Start a server for `instance` on `instance.port` with its options and credentials.

        Returns once the server accepts a login, or raises BackendError.
        """
        raise NotImplementedError("Backends must implement create().")

    def destroy(self, instance: "Instance") -> None:
        """Stop the server, if any, and remove everything `create` made, data included."""
        raise NotImplementedError("Backends must implement destroy().")

    def stop(self, instance: "Instance") -> None:
        """Stop the server cleanly; keep its data and configuration."""
        raise NotImplementedError("Backends must implement stop().")

    def start(self, instance: "Instance") -> None:
        """Start a stopped (or dead) server again, on `instance.port` if the backend `moves_ports`;
        return once the user's login works."""
        raise NotImplementedError("Backends must implement start().")

    def restart(self, instance: "Instance") -> None:
        """Stop whatever runs (cleanly if it can), then start; return once a login works."""
        self.stop(instance)
        self.start(instance)

    def set_password(self, instance: "Instance", password: str) -> None:
        """Replace the user's password on the running server; the old one must stop working."""
        raise NotImplementedError("Backends must implement set_password().")

    def server_version(self, instance: "Instance") -> str:
        """The version the running server reports (`Engine.server_version`), read through the
        portal's own way in, as `set_password` administers it; raise BackendError if it cannot."""
        raise NotImplementedError("Backends must read a server's version.")

    def host_version(self, kind: str) -> str:
        """The version a server of `kind` started now would run: the host's program, or the image's
        (`Engine.program_version`); kept until the program or image changes, so asking is cheap.
        Raise BackendError if it cannot be told."""
        raise NotImplementedError("Backends must say which server version they would start.")

    def upgrade(self, instance: "Instance") -> str:
        """Bring the running instance's data up to its server's version (`Engine.upgrade`, run beside
        it); a sentence saying what was done, "" if nothing was. Raise BackendError if it failed."""
        with self._beside(instance) as beside:
            return get_engine(instance.kind).upgrade(instance, beside)

    def reload_tls(self, instance: "Instance") -> bool:
        """Write the instance's TLS files again (a renewed certificate) and make its running server
        read them, where its engine can (`Engine.reload_tls`); False if it takes them at its next
        start only."""
        return False

    def reconfigure(
        self, instance: "Instance", changes: dict[str, Any], *, undo: dict[str, Any], memory_limit: int | None = None
    ) -> None:
        """Change the running server: `changes` are live options (`Engine.apply_live`; `undo` their
        values now) and `memory_limit`, if given, its kernel or container memory limit in bytes. All
        or nothing: a limit is raised before the server grows, and lowered after it shrank and only
        if what it then uses fits (else the options are put back); a refusal undoes what was
        changed. Raise BackendError saying why.

        Backends give the parts: `memory` (the limit now and what is in use), `set_memory_limit`
        and `admin` (the portal's way in); one without a limit of its own returns None for it."""
        now = self.memory(instance)[0] if memory_limit is not None else None
        grows = now is not None and memory_limit is not None and memory_limit > now
        shrinks = now is not None and memory_limit is not None and not grows
        if grows:
            self.set_memory_limit(instance, memory_limit)  # type: ignore[arg-type]
        try:
            self._apply_live(instance, changes)
        except Exception:
            if grows:
                self.set_memory_limit(instance, now)  # type: ignore[arg-type]
            raise
        if shrinks:
            try:
                check_fits(memory_limit, self.memory(instance)[1])  # type: ignore[arg-type]
                self.set_memory_limit(instance, memory_limit)  # type: ignore[arg-type]
            except Exception:
                self._apply_live(instance, undo)
                raise

    def _apply_live(self, instance: "Instance", changes: dict[str, Any]) -> None:
        if changes:
            with self.admin(instance) as admin:
                get_engine(instance.kind).apply_live(instance, changes, admin=admin)

    def keep_config(self, instance: "Instance") -> None:
        """Write the server's config files again from the instance's options, after a live change,
        where the server may be restarted without the portal (a container's restart policy). A
        backend that writes them before every start of its own needs nothing."""

    def memory(self, instance: "Instance") -> tuple[int | None, int | None]:
        """The running server's memory limit now and the bytes it uses that a lower limit could not
        take back (None, None: the backend sets no limit of its own)."""
        return None, None

    def set_memory_limit(self, instance: "Instance", memory: int) -> None:
        """Change the running server's kernel or container memory limit; it goes on running."""
        raise BackendError(f"The {self.alias} backend cannot change a memory limit.")

    def admin(self, instance: "Instance") -> AbstractContextManager[Endpoint]:
        """Where the portal's own account reaches the running server, while the block runs."""
        raise BackendError(f"The {self.alias} backend cannot administer a running server.")

    def client_connections(self, instance: "Instance") -> int:
        """How many connections the tenant's clients hold open on the running server
        (`Engine.client_connections`); raise BackendError if it cannot tell."""
        raise BackendError(f"The {self.alias} backend cannot count client connections.")

    def snapshot(self, instance: "Instance", out: IO[bytes], archive: LogArchive | None = None) -> str:
        """Write a consistent copy of the running instance's data to `out`, as its engine takes it
        (`Engine.snapshot`), while the server goes on serving; raise BackendError if it cannot.
        Returns where the log after it begins, "" if it cannot be a point-in-time base."""
        with self._beside(instance) as beside:
            return get_engine(instance.kind).snapshot(instance, beside, out, archive)

    def archive_logs(self, instance: "Instance", archive: LogArchive) -> None:
        """Copy the running server's closed log files into `archive` (`Engine.archive_logs`)."""
        with self._beside(instance) as beside:
            get_engine(instance.kind).archive_logs(instance, beside, archive)

    def _beside(self, instance: "Instance") -> AbstractContextManager[Beside]:
        """Where the engine's programs run beside the running server (its snapshots, log archiving,
        upgrades and imports), while the block runs."""
        raise BackendError(f"The {self.alias} backend cannot run programs beside its servers.")

    def restore(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        """Stop the server, replace its data with `snapshot` and, with `replay`, the logged writes
        after it up to a time (`Engine.restore`), and start it as at its first start, so its
        accounts and passwords are the instance's own; return once the user's login works. Safe to
        call again after it was cut short."""
        raise BackendError(f"The {self.alias} backend cannot restore snapshots.")

    def export_snapshot(self, kind: str, snapshot: IO[bytes], out: IO[bytes], *, database: str) -> None:
        """Write the portable file of a snapshot of `kind` to `out` (`Engine.export`), made in a
        throwaway folder of the portal's by a uid of its own; the snapshot's instance may be gone.
        Raise BackendError if it cannot be made."""
        raise BackendError(f"The {self.alias} backend cannot export snapshots.")

    def verify_snapshot(self, kind: str, snapshot: IO[bytes], *, database: str) -> str:
        """Load a snapshot of `kind` into a throwaway server, as `export_snapshot` works, and check
        its data (`Engine.verify`): what was found, or BackendError saying what is wrong."""
        raise BackendError(f"The {self.alias} backend cannot verify snapshots.")

    def check_import(self, instance: "Instance", upload: IO[bytes]) -> None:
        """Raise ImportRefused unless the running instance can take the uploaded file
        (`Engine.check_import`); nothing of its data changes."""
        with self._beside(instance) as beside:
            get_engine(instance.kind).check_import(instance, beside, upload)

    def import_data(self, instance: "Instance", upload: IO[bytes]) -> None:
        """Load a checked file into the instance (`Engine.load`, as its tenant), or put it in place
        of its data as a snapshot is restored (`Engine.import_replaces_data`); return once the
        user's login works. On failure its data may be part old, part new: the caller puts back a
        snapshot."""
        engine = get_engine(instance.kind)
        if engine.import_replaces_data:
            upload.seek(0)
            self.restore(instance, upload)
            return
        with self._beside(instance) as beside:
            engine.load(instance, beside, upload)

    def enforce_disk_limit(self, instance: "Instance") -> str | None:
        """Asked by the reconciler about each running instance that answers: a short message for its
        status, beginning with DISK_FULL, if its data has reached its disk limit, else None.

        Where the kernel enforces the limit this only looks; where it does not, the backend makes
        the server refuse writes while it is full (reads still work), and accept them again once it
        has room.
        """
        return None

    @staticmethod
    def usual_disks() -> set[int]:
        """The disk limits instances get unless they ask for another (worth keeping ready)."""
        options = [option for engine in engines().values() for option in engine.options if option.name == "disk"]
        return {settings.STOCKROOM_DEFAULT_DISK, *(o.default for o in options if isinstance(o.default, int))}

    def why_down(self, instance: "Instance") -> str | None:
        """What the backend knows of why the instance's server stopped answering (it ran out of
        memory, say), as a short clause for its status; None if it knows nothing."""
        return None

    def unreachable(self, instance: "Instance") -> str | None:
        """Why the host of an instance whose server does not answer is out of the portal's reach (a
        clause for its status), or None if its host is there (the server itself is down). Backends
        of one host never say."""
        return None

    def probe(self, instance: "Instance", timeout: float = 2.0) -> None:
        """Log in with the user's credentials; raise if the server does not answer.

        Over TCP, only once the listener on the port is seen to be the instance's (`holds_port`):
        while a server is down, anyone on the host may listen on its port and wait for a login.
        """
        if instance.port is None:
            raise BackendError("The instance has no port: it holds no server.")
        get_engine(instance.kind).check_login(instance, self.checked_login_endpoint(instance), timeout=timeout)

    def checked_login_endpoint(self, instance: "Instance") -> Endpoint:
        """`login_endpoint`, once it is safe to send it credentials: a Unix socket as it is; TCP only
        after `check_listener` (which raises otherwise)."""
        endpoint = self.login_endpoint(instance)
        if endpoint.socket is None:
            self.check_listener(instance)
        return endpoint

    def login_endpoint(self, instance: "Instance") -> Endpoint:
        """Where the portal's own logins reach the server (the checks of the user's login, and the
        administrative account): the instance's Unix socket where the portal can reach it, which
        only the server can listen on. The default is TCP on the instance's port, which `probe`
        uses only after `holds_port` has seen that the instance's server listens there.

        Users always get TCP host and port; this is the portal's way in only.
        """
        assert instance.port is not None, "only an instance that holds a port has a server"
        return Endpoint(self.probe_host, instance.port)

    def instance_pids(self, instance: "Instance") -> set[int]:
        """The instance's processes, as this host's /proc numbers them, that may hold the socket
        listening on its port (the server; a proxy that publishes its port). Backends whose
        `login_endpoint` is TCP must say; the others need not."""
        raise NotImplementedError("Backends that log in over TCP must say which processes are the instance's.")

    def holds_port(self, instance: "Instance") -> bool:
        """Whether the instance's own processes, and nobody else, listen on its port."""
        assert instance.port is not None, "only an instance that holds a port has a server"
        pids = self.instance_pids(instance)
        return bool(pids) and listeners.only_held_by(self.probe_host, instance.port, pids)

    def check_listener(self, instance: "Instance") -> None:
        """Raise unless the instance's own processes, and nobody else, listen on its port:
        ConnectionRefusedError if nothing does, StrangerOnPort if anyone else does."""
        assert instance.port is not None, "only an instance that holds a port has a server"
        if not listeners.listening_inodes(self.probe_host, instance.port):
            raise ConnectionRefusedError(f"Nothing listens on port {instance.port}.")
        if not self.holds_port(instance):
            raise StrangerOnPort(
                f"Something other than the instance's server listens on port {instance.port}; "
                "the portal sent it no credentials."
            )

    def login_error(self, instance: "Instance", *, timeout: float, tries: int = 1, pause: float = 0.2) -> str | None:
        """None if the user's login works (within `tries`, `pause` s apart), else a short reason."""
        for attempt in range(tries):
            if attempt:
                time.sleep(pause)
            try:
                self.probe(instance, timeout=timeout)
                return None
            except Exception as exc:  # noqa: BLE001 - any failure means "does not answer"
                error = type(exc).__name__
        return error

    def wait_for_login(self, instance: "Instance", *, exited: Callable[[], bool], log_tail: Callable[[], str]) -> None:
        """Poll until the user's credentials work, the server has exited, or time runs out."""
        deadline = self.clock() + settings.STOCKROOM_START_TIMEOUT
        last_error: Exception | None = None
        listening = False
        while self.clock() < deadline:
            if not listening and (listening := self._accepts_connections(instance)):
                instance.mark("server_start")
            try:
                self.probe(instance)
                if not listening:  # it came up between the two checks
                    instance.mark("server_start")
                instance.mark("first_login")
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
                last_error = exc
            if exited():
                raise ServerExited(f"The server exited during start-up. {log_tail()}")
            time.sleep(self.poll_interval)
        raise BackendError(
            f"The server did not accept a login within {settings.STOCKROOM_START_TIMEOUT:g} s "
            f"({type(last_error).__name__}). {log_tail()}"
        )

    def _accepts_connections(self, instance: "Instance") -> bool:
        """Whether the server takes connections where the portal logs in (nothing is sent)."""
        endpoint = self.login_endpoint(instance)
        try:
            if endpoint.socket:
                with socket.socket(socket.AF_UNIX) as unix:
                    unix.settimeout(1)
                    unix.connect(endpoint.socket)
            else:
                socket.create_connection((endpoint.host, endpoint.port), timeout=1).close()
        except OSError:
            return False
        return True

    def place(self, needs: int, reserved: dict[str, int]) -> str:
        """For a backend that `places`: the host a new server that reserves `needs` bytes of memory
        goes on, given what the portal's instances of this backend reserve on each host already
        (host -> bytes). Raises NoRoom if no host has room."""
        raise NotImplementedError("Backends that place servers must say where.")

    def nodes(self, *, fresh: bool = False) -> list[Node]:
        """For a backend that `places`: every host it may place servers on (a Node each, whether it
        takes instances now or not), a listing a moment old unless `fresh`. Raises BackendError if
        the hosts' manager cannot be asked."""
        raise NotImplementedError("Backends that place servers must list their nodes.")

    def set_availability(self, node_id: str, availability: str) -> None:
        """For a backend that `places`: make node `node_id` take new servers ("active") or not
        ("pause", its own keep running). Raises BackendError if it cannot."""
        raise NotImplementedError("Backends that place servers must let an operator pause a node.")

    def node_by_id(self, node_id: str) -> Node | None:
        return next((node for node in self.nodes() if node.id == node_id), None)

    def move(self, instance: "Instance", source: tuple[str, int], spool: IO[bytes]) -> float:
        """For a backend that `places`: move the running server at `source` (host, port) to
        `instance.host` and `instance.port`, with its data, its snapshot passing through `spool`;
        the seconds its writes were refused. If it fails, the old server runs on as it was."""
        raise BackendError(f"The {self.alias} backend has one host: there is nowhere to move to.")

    def move_made(self, instance: "Instance") -> bool:
        """For a backend that `places`, after a `move` cut short (its worker died): whether it made
        the new server at `instance.host` (which may have taken writes since)."""
        raise BackendError(f"The {self.alias} backend has one host: it moves nothing.")

    def end_move(self, instance: "Instance", *, source: tuple[str, int], target: tuple[str, int], moved: bool) -> None:
        """For a backend that `places`, after a `move` from `source` to `target` (host, port) cut
        short: `moved` (it stands), what is left at `source` goes; else what the move made at
        `target` goes, and the server at `source` runs again from its own data."""
        raise BackendError(f"The {self.alias} backend has one host: it moves nothing.")

    def rebuild(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        """For a backend that `places`: make the server again on `instance.host` and `instance.port`
        from `snapshot`, its old host out of reach."""
        raise BackendError(f"The {self.alias} backend has one host: there is nowhere to rebuild on.")

    def check(self) -> str:
        """Whether the backend can create instances now; for /healthz.

        Returns a short description on success; raises BackendError saying what is wrong.
        """
        raise NotImplementedError("Backends must say whether they are usable.")

    def forget_ready(self) -> None:
        """Give back whatever is kept ready for instances to come (filesystems, say), as before the
        portal's data goes."""

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        """What this backend keeps for the portal that belongs to none of `known_ids`.

        Returns {key: description}; `remove_orphan(key)` removes one.
        """
        raise NotImplementedError("Backends must list their orphans.")

    def remove_orphan(self, key: str) -> None:
        raise NotImplementedError("Backends must remove their orphans.")

    @property
    def probe_host(self) -> str:
        """Where the worker reaches instance servers."""
        return str(settings.STOCKROOM_BIND_ADDRESS)

    @property
    def public_host(self) -> str:
        """The host name or address users connect to."""
        return str(settings.STOCKROOM_PUBLIC_HOST)

    def port_is_free(self, port: int) -> bool:
        """Whether nothing on the host listens on `port` (instances' own ports are checked apart).

        The probe binds as servers do, with SO_REUSEADDR: a port whose last connections linger in
        TIME_WAIT is free to them, and only a listener (or a socket bound without it) holds it.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((settings.STOCKROOM_BIND_ADDRESS, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise
        return True


def check_fits(limit: int, in_use: int | None) -> None:
    """Refuse a memory limit below what the server uses now: the kernel would kill it."""
    if in_use is not None and limit < in_use:
        raise BackendError(
            f"The server uses {describe_size(in_use)} now, more than the new limit of {describe_size(limit)}; "
            "free some memory (or restart it) first."
        )


_loaded: dict[tuple[str, str], BaseBackend] = {}


def get_backend(alias: str | None = None) -> BaseBackend:
    """The backend for `alias` (default: STOCKROOM_DEFAULT_BACKEND), made once per configuration."""
    alias = alias or settings.STOCKROOM_DEFAULT_BACKEND
    config: dict[str, Any] = settings.STOCKROOM_BACKENDS[alias]
    key = (alias, json.dumps(config, sort_keys=True, default=str))
    if key not in _loaded:
        backend: BaseBackend = import_string(config["BACKEND"])(alias, **config.get("OPTIONS", {}))
        _loaded[key] = backend
    return _loaded[key]
