"""An in-memory backend for logic tests: it keeps per-instance state and can be told to fail.

It starts no server and proves nothing about provisioning; tests that claim "it works" use a real
backend. Tests select it through settings (STOCKROOM_BACKENDS["fake"], STOCKROOM_DEFAULT_BACKEND)
and reach it with get_backend("fake").
"""

import io
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from ..engines import LogArchive, Replay
from ..errors import NoRoom
from .base import BackendError, BaseBackend, ImportRefused, Node
from .swarm import NODE_GONE

if TYPE_CHECKING:
    from ..models import Instance


@dataclass
class Server:
    """What a real backend would have for one instance: a process (or not), a password, data."""

    port: int | None  # as the instance had it; None once it failed
    options: dict[str, Any]
    password: str
    running: bool = True
    version: str = ""  # the version it runs: the backend's `version` when it was last started
    upgraded_to: str = ""  # the version `upgrade` last brought its data up to
    data: dict[str, Any] = field(default_factory=dict)  # survives stop, start and restart; not destroy
    # Every write since the server's data was last replaced, as [unix time, key, value], and how
    # many of them are archived: its log, as a binary log or append-only file would hold it.
    log: list[list[Any]] = field(default_factory=list)
    archived: int = 0
    memory_limit: int | None = None  # as `reconfigure` last set it
    clients: int = 0  # client connections open on it; a stop or a start ends them

    def write(self, key: str, value: Any, *, at: float | None = None) -> None:
        self.data[key] = value
        self.log.append([time.time() if at is None else at, key, value])


FAKE_VERSION = "1.0.0-fake"


class NotAnswering(ConnectionRefusedError):
    """What a probe of a server that is not running gets."""


class FakeBackend(BaseBackend):
    OPERATIONS: tuple[str, ...] = (
        "create",
        "destroy",
        "stop",
        "start",
        "set_password",
        "probe",
        "check",
        "remove_orphan",
        "export_snapshot",
        "verify_snapshot",
        "snapshot",
        "restore",
        "archive_logs",
        "check_import",
        "import_data",
        "server_version",
        "upgrade",
        "reconfigure",
        "client_connections",
    )
    moves_ports = True  # a start serves the instance on the port it has then, as the local backend does
    point_in_time = True

    def __init__(self, alias: str, **options: Any):
        super().__init__(alias, **options)
        self.lock = threading.Lock()  # the reconciler probes from a pool of threads
        self.reset()

    def reset(self) -> None:
        """Forget every server, queued failure, squatted port and recorded call."""
        with self.lock:
            self.servers: dict[int, Server] = {}
            self.failures: dict[str, list[Exception]] = {}
            self.squatted: set[int] = set()  # ports something outside the portal listens on
            self.calls: list[tuple[str, int | None]] = []
            self.while_probing: Callable[[Instance], None] | None = None
            self.version = FAKE_VERSION  # what a server started now runs: set it to "upgrade the host"

    # Test controls -----------------------------------------------------------------------

    def fail_next(self, operation: str, error: Exception, *, times: int = 1) -> None:
        """The next `times` calls of `operation` raise `error` (after doing nothing, except that a
        failing create leaves a half-made server behind, as a real one may)."""
        if operation not in self.OPERATIONS:
            raise ValueError(f"{operation!r} is not one of {', '.join(self.OPERATIONS)}")
        with self.lock:
            self.failures.setdefault(operation, []).extend([error] * times)

    def kill(self, instance_id: int) -> None:
        """What `kill -9` does: the server is gone, its data stays; probes fail until it is started."""
        with self.lock:
            self.servers[instance_id].running = False

    def connect(self, instance_id: int, clients: int = 1) -> None:
        """Clients open (or, with a negative number, close) connections to the server."""
        with self.lock:
            server = self.servers[instance_id]
            server.clients = max(server.clients + clients, 0)

    def server(self, instance_id: int) -> Server | None:
        return self.servers.get(instance_id)

    def called(self, operation: str) -> list[int | None]:
        """The instance ids `operation` was called for, in order."""
        return [pk for name, pk in self.calls if name == operation]

    def _enter(self, operation: str, instance_id: int | None) -> None:
        """Record the call; raise the failure queued for it, if any."""
        with self.lock:
            self.calls.append((operation, instance_id))
            queued = self.failures.get(operation)
            error = queued.pop(0) if queued else None
        if error is not None:
            raise error

    def _server(self, instance: "Instance") -> Server:
        try:
            return self.servers[instance.pk]
        except KeyError:
            raise BackendError(f"There is no server for instance {instance.pk}.") from None

    # The contract ----------------------------------------------------------------------

    def create(self, instance: "Instance") -> None:
        server = Server(
            port=instance.port,
            options=dict(instance.options),
            password=instance.password,
            version=self.version,
            upgraded_to=self.version,
        )
        with self.lock:
            self.servers[instance.pk] = server
        self._enter("create", instance.pk)
        instance.mark("server_start")
        instance.mark("first_login")

    def destroy(self, instance: "Instance") -> None:
        self._enter("destroy", instance.pk)
        with self.lock:
            self.servers.pop(instance.pk, None)

    def stop(self, instance: "Instance") -> None:
        self._enter("stop", instance.pk)
        with self.lock:
            if instance.pk in self.servers:  # stopping what is not there is not an error
                self.servers[instance.pk].running = False
                self.servers[instance.pk].clients = 0

    def start(self, instance: "Instance") -> None:
        self._enter("start", instance.pk)
        server = self._server(instance)
        if instance.port in self.squatted:  # as a real server that cannot listen exits
            raise BackendError(f"The server could not listen on port {instance.port}: another process holds it.")
        with self.lock:
            server.running, server.port, server.version = True, instance.port, self.version
            server.options = dict(instance.options)  # as a real server reads its config again
        if server.password != instance.password:
            raise BackendError("The server started, but the user's login was refused.")

    def reconfigure(
        self, instance: "Instance", changes: dict[str, Any], *, undo: dict[str, Any], memory_limit: int | None = None
    ) -> None:
        self._enter("reconfigure", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        with self.lock:
            server.options.update(changes)
            if memory_limit is not None:
                server.memory_limit = memory_limit

    def snapshot(self, instance: "Instance", out: IO[bytes], archive: LogArchive | None = None) -> str:
        self._enter("snapshot", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        with self.lock:
            out.write(json.dumps(server.data).encode())
            return str(len(server.log))  # the log after it: the writes from this one on

    def archive_logs(self, instance: "Instance", archive: LogArchive) -> None:
        self._enter("archive_logs", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        before = time.time()
        with self.lock:
            first, server.archived = server.archived, len(server.log)
            closed = server.log[first:]

        # A file per pass, named by the position of its first write, as binary logs are numbered.
        def fill(out: IO[bytes]) -> None:
            out.write(json.dumps(closed).encode())

        archive.save(f"{first:09d}", fill)
        archive.covered(datetime.fromtimestamp(before, UTC))

    def restore(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        self._enter("restore", instance.pk)
        server = self._server(instance)
        data = json.loads(snapshot.read())
        if replay is not None:
            for log in sorted(replay.logs, key=lambda log: log.name):
                with log.open() as file:
                    writes = json.load(io.TextIOWrapper(file))
                for position, (at, key, value) in enumerate(writes, start=int(log.name)):
                    if position >= int(replay.start) and at < replay.until.timestamp():
                        data[key] = value
        with self.lock:
            server.data, server.running, server.password = data, True, instance.password
            server.version = self.version
            server.log, server.archived = [], 0

    def export_snapshot(self, kind: str, snapshot: IO[bytes], out: IO[bytes], *, database: str) -> None:
        """The fake's portable file is its snapshot's data, as sorted JSON."""
        self._enter("export_snapshot", None)
        out.write(json.dumps(self._load(snapshot), sort_keys=True).encode())

    def verify_snapshot(self, kind: str, snapshot: IO[bytes], *, database: str) -> str:
        self._enter("verify_snapshot", None)
        return f"It loads: {len(self._load(snapshot))} keys."

    @staticmethod
    def _load(snapshot: IO[bytes]) -> dict[str, Any]:
        try:
            data = json.loads(snapshot.read())
        except ValueError:
            raise BackendError("The snapshot does not load: it is not the fake's data.") from None
        if not isinstance(data, dict):
            raise BackendError("The snapshot does not load: it is not the fake's data.")
        return data

    def check_import(self, instance: "Instance", upload: IO[bytes]) -> None:
        """A file for a fake server is a JSON object of keys; anything else is refused."""
        self._enter("check_import", instance.pk)
        if not self._server(instance).running:
            raise BackendError("The server is not running.")
        try:
            data = json.loads(upload.read())
        except ValueError as exc:
            raise ImportRefused(f"The file is not a JSON object ({exc}).") from None
        finally:
            upload.seek(0)
        if not isinstance(data, dict):
            raise ImportRefused("The file is not a JSON object.")

    def import_data(self, instance: "Instance", upload: IO[bytes]) -> None:
        """Its keys are written one by one, as a dump's statements run: a failure queued for
        `import_data` comes after half of them."""
        items = list(json.loads(upload.read()).items())
        server = self._server(instance)
        with self.lock:
            server.data.update(items[: len(items) // 2])
        self._enter("import_data", instance.pk)
        with self.lock:
            server.data.update(items)

    def set_password(self, instance: "Instance", password: str) -> None:
        self._enter("set_password", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        with self.lock:
            server.password = password

    def server_version(self, instance: "Instance") -> str:
        self._enter("server_version", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        return server.version

    def host_version(self, kind: str) -> str:
        return self.version

    def upgrade(self, instance: "Instance") -> str:
        """As mariadb-upgrade: nothing when the data is of the server's version already."""
        self._enter("upgrade", instance.pk)
        server = self._server(instance)
        if server.upgraded_to == server.version:
            return ""
        with self.lock:
            server.upgraded_to = server.version
        return f"Upgraded the fake's data to {server.version}."

    def client_connections(self, instance: "Instance") -> int:
        self._enter("client_connections", instance.pk)
        server = self._server(instance)
        if not server.running:
            raise BackendError("The server is not running.")
        return server.clients

    def probe(self, instance: "Instance", timeout: float = 2.0) -> None:
        if self.while_probing is not None:
            self.while_probing(instance)
        self._enter("probe", instance.pk)
        server = self.servers.get(instance.pk)
        if server is None or not server.running:
            raise NotAnswering(f"Nothing answers on port {instance.port}.")
        if server.password != instance.password:
            raise PermissionError("The user's login was refused.")

    def login_error(self, instance: "Instance", *, timeout: float, tries: int = 1, pause: float = 0.2) -> str | None:
        return super().login_error(instance, timeout=timeout, tries=tries, pause=0)  # no server to wait for

    def check(self) -> str:
        self._enter("check", None)
        return f"Fake backend with {len(self.servers)} servers."

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        with self.lock:
            return {str(pk): f"fake server on port {s.port}" for pk, s in self.servers.items() if pk not in known_ids}

    def remove_orphan(self, key: str) -> None:
        self._enter("remove_orphan", int(key))
        with self.lock:
            self.servers.pop(int(key), None)

    def port_is_free(self, port: int) -> bool:
        with self.lock:
            return port not in self.squatted and not any(s.running and s.port == port for s in self.servers.values())

    def holds_port(self, instance: "Instance") -> bool:
        server = self.servers.get(instance.pk)
        return server is not None and server.running and server.port == instance.port


class FakeFleetBackend(FakeBackend):
    """The fake, on many hosts as the swarm backend is: servers are placed on nodes (`add_node`),
    by free memory among the usable ones; a node that is not ready makes its instances unreachable.
    Fail `nodes` to play a manager that does not answer."""

    OPERATIONS = (*FakeBackend.OPERATIONS, "nodes", "set_availability", "move", "move_made", "end_move", "rebuild")
    places = True

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.fleet: dict[str, Node] = {}

    def add_node(
        self,
        node_id: str,
        *,
        address: str,
        public_host: str = "",
        memory: int = 4 * 2**30,
        state: str = "ready",
        availability: str = "active",
        labelled: bool = True,
        role: str = "worker",
        hostname: str = "",
    ) -> Node:
        node = Node(
            id=node_id,
            hostname=hostname or f"host-{node_id}",
            address=address,
            public_host=public_host or address,
            state=state,
            availability=availability,
            role=role,
            labelled=labelled,
            memory=memory,
        )
        with self.lock:
            self.fleet[node_id] = node
        return node

    def set_state(self, node_id: str, state: str) -> None:
        """What a node's network cut (down) and return (ready) look like to the manager."""
        with self.lock:
            self.fleet[node_id] = replace(self.fleet[node_id], state=state)

    def nodes(self, *, fresh: bool = False) -> list[Node]:
        self._enter("nodes", None)
        with self.lock:
            return list(self.fleet.values())

    def set_availability(self, node_id: str, availability: str) -> None:
        self._enter("set_availability", None)
        if availability not in ("active", "pause"):  # as SwarmBackend's: a drain is the portal's moves
            raise BackendError(f"A node's availability is active or pause, not {availability!r}.")
        with self.lock:
            if node_id not in self.fleet:
                raise BackendError(f"The swarm could not find the node: node {node_id} not found.")
            self.fleet[node_id] = replace(self.fleet[node_id], availability=availability)

    def place(self, needs: int, reserved: dict[str, int]) -> str:
        usable = [node for node in self.nodes(fresh=True) if node.usable]
        free = {node.id: node.memory - reserved.get(node.public_host, 0) for node in usable}
        best = max(usable, key=lambda node: free[node.id], default=None)
        if best is None or free[best.id] < needs:
            raise NoRoom("No node has room for it.")
        return best.public_host

    def move(self, instance: "Instance", source: tuple[str, int], spool: IO[bytes]) -> float:
        """The server goes to the instance's new host and port with its data, through `spool` as a
        snapshot would; a failure leaves it as it was."""
        self._enter("move", instance.pk)
        server = self._server(instance)
        with self.lock:
            spool.write(json.dumps(server.data).encode())
            spool.seek(0)
            server.data = json.loads(spool.read())
            server.port = instance.port
        return 0.25

    def probe(self, instance: "Instance", timeout: float = 2.0) -> None:
        super().probe(instance, timeout)
        if self.servers[instance.pk].port != instance.port:  # a move's new port, before it moved
            raise NotAnswering(f"Nothing answers on port {instance.port}.")

    def move_made(self, instance: "Instance") -> bool:
        self._enter("move_made", instance.pk)
        return self._server(instance).port == instance.port

    def end_move(self, instance: "Instance", *, source: tuple[str, int], target: tuple[str, int], moved: bool) -> None:
        """The server where the move left it (`moved`), else back at `source`'s port, running."""
        self._enter("end_move", instance.pk)
        server = self._server(instance)
        with self.lock:
            server.port, server.running = (target[1] if moved else source[1]), True

    def rebuild(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        """The server made again from `snapshot` on the instance's new host and port."""
        self._enter("rebuild", instance.pk)
        server = self._server(instance)
        with self.lock:
            server.data, server.log, server.running, server.port = json.loads(snapshot.read()), [], True, instance.port

    def unreachable(self, instance: "Instance") -> str | None:
        for node in self.nodes():
            if node.public_host == instance.host and node.state != "ready":
                return NODE_GONE.format(node=node.hostname, state=node.state)
        return None
