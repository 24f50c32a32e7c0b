"""Instances spread over the hosts of a Docker Swarm: one service per instance, through the manager.

Each instance is a service with one replica, pinned by a node constraint to the node that holds its
data, on that node's host network: its server listens at the node's address on the instance's port,
and users connect to the node's public host (its `stockroom.public-host` label, else the address it
advertises). Services, their secrets and the jobs below are labelled with this portal's id, so the
portal finds its own and tells them from anyone else's.

Placement happens when the instance is requested (`place`): among the ready, active nodes that
carry the node label (`stockroom.role=db`), the one with the most memory free, that is its memory
less the reservations of this portal's instances placed there and of other services' tasks. The
instance's host is that node's, and ports are unique per host, so they are unique per node.

On the node, the instance's files live in `<data_root>/<portal id>/<kind>-<id>/`: a folder of root's
that holds `data`, `tmp` and `run` (its socket), the server's, owned by its uid (`uid_base` + id), which owns nothing
else. Short-lived job services pinned to the node make the folder and remove it; the portal never
reads a node's disk. The server runs as that uid with no capability and a read-only root, its
memory reserved and limited. Its config, password and first-start files are Swarm secrets (the
Raft log keeps them encrypted; a container sees them in memory), never its environment or command
line. A secret cannot change, so what the portal changes on a running server it changes through the
server (`Layout.admin_from`: the engine keeps it on the server's own disk); the files are made
again, as new secrets, at the next start.

The portal administers a server over TCP at its node's address (there is no `docker exec` across
nodes), as the engine's administrative account, which accepts the portal's address alone where the
engine's accounts can say so; over TLS when the instance serves TLS. Snapshots and restores run the
engine's programs in jobs on the node, whose standard input and output are a connection back to the
portal (`_beside_job`). A node that Swarm no longer reports ready makes its instances `unreachable`
(the reconciler), until it is back.
"""

import copy
import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property, partial
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings

from ..engines import Container, Endpoint, Layout, Replay, ca_of, get_engine
from ..errors import BackendError, NoRoom
from ..options import TLS_OFF, describe_size
from .base import BaseBackend, Node
from .containers import DockerBeside, Relay, docker_calls
from .processes import helper_failed

if TYPE_CHECKING:
    from ..models import Instance

logger = logging.getLogger(__name__)

LABEL = "io.stockroom"
JOB = f"{LABEL}.job"  # the label of a job service (making or removing an instance's folder)
PORT = f"{LABEL}.port"  # an instance service's label: the port its server listens on
PUBLIC_HOST_LABEL = "stockroom.public-host"  # a node label: the name users connect to it by
PAUSED_LABEL = "stockroom.paused"  # a node label: the portal places no new instance there
JOB_ROOT = PurePosixPath("/stockroom")  # where a job has the nodes' `data_root`
NODES_SECONDS = 2.0  # how long a listing of the nodes is taken as current
STOP_GRACE_NS = 30 * 10**9  # a server gets this long to stop cleanly before it is killed
NODE_GONE = "its node {node} is not ready in the swarm ({state})"
ENDED = ("complete", "failed", "rejected")  # a task in these states will not run again
HELPER_DISK = PurePosixPath("/stockroom/disk")  # where a restore's job has the instance's folder
SCRATCH = PurePosixPath("/scratch")  # where a throwaway server's job has its folder
SCRATCH_MEMORY = 512 * 2**20  # a throwaway server's memory limit
JOB_PIDS = 256  # a job's processes and threads (a replay's or a throwaway's server among them)
NOBODY = 65534  # the uid and gid of a job that needs no file of its node (it reads a version)
TOKEN_FILE = PurePosixPath("/run/secrets/stockroom-token")  # a job's one-time token, in its memory
SECRET_FILE = PurePosixPath("/run/secrets/stockroom-options")  # a job's `{secret}`, in its memory
# A job beside a server: its standard input and output are a connection to the portal ($1:$2),
# which it opens with its token; then "$@" runs on it. Its error output goes to its log.
CONNECT_BACK = f'set -eu; exec 3<>"/dev/tcp/$1/$2"; shift 2; cat {TOKEN_FILE} >&3; exec "$@" <&3 >&3 3>&-'
# $1 (an instance's folder, as a root job sees it) made anew: root's, with data, tmp and run of uid $2.
MAKE = (
    'set -eu; umask 077; rm -rf -- "$1"; mkdir -p -- "$1/data" "$1/tmp" "$1/run"; '
    'chown -- "$2:$2" "$1/data" "$1/tmp" "$1/run"; chown root:root "$1"; chmod 700 "$1" "$1"/*'
)
# $1 opened to a restore: uid $2's group may write in it (to put a new `data` in place of the old).
OPEN = 'chgrp -- "$2" "$1" && chmod 0770 "$1"'
# $1 (an instance's folder, as a root job sees it) root's alone again, and data, tmp and run in it
# folders of uid $2, not links: a restore let the uid's group write in it.
SEAL = (
    'set -eu; chown root:root -- "$1"; chmod 0700 -- "$1"; for d in data tmp run; do '
    'p="$1/$d"; if [ -L "$p" ] || [ ! -d "$p" ] || [ "$(stat -c %u -- "$p")" != "$2" ]; then '
    'echo "$d is not the server\'s folder; it is not started." >&2; exit 1; fi; done'
)


class SwarmBackend(BaseBackend):
    poll_interval = 0.1

    def __init__(
        self,
        alias: str,
        *,
        manager_url: str,
        portal_address: str,
        data_root: str,
        images: dict[str, str],
        node_label: str = "stockroom.role=db",
        portal_id: str = "default",
        uid_base: int = 2_000_000_000,
        job_timeout: float = 120.0,
    ):
        super().__init__(alias)
        self.manager_url = manager_url
        self._docker = docker_calls("The swarm", f"The swarm manager at {manager_url}")
        self.portal_address = str(ipaddress.ip_address(portal_address)) if portal_address else ""
        self.data_root = PurePosixPath(data_root)
        self.images = dict(images)
        if "=" not in node_label:
            raise BackendError(f"SWARM_NODE_LABEL must be name=value, not {node_label!r}.")
        self.node_label = tuple(node_label.split("=", 1))
        self.portal_id = portal_id
        self.uid_base = int(uid_base)
        self.job_timeout = job_timeout
        self._nodes: tuple[float, list[Node]] = (0.0, [])

    @cached_property
    def client(self) -> Any:
        import docker

        return self._docker("connect", docker.DockerClient, base_url=self.manager_url, timeout=30)

    # Nodes and placement ----------------------------------------------------------------

    places = True
    point_in_time = True  # the engine's archiving and replay run in jobs beside the server
    remote_admin = True
    changes_memory_live = False  # Swarm replaces a task whose resources change: a restart
    ports_per_instance = 2

    def nodes(self, *, fresh: bool = False) -> list[Node]:
        """Every node of the swarm; a listing up to NODES_SECONDS old unless `fresh`."""
        listed_at, nodes = self._nodes
        if fresh or time.monotonic() - listed_at > NODES_SECONDS:
            found = self._docker("list its nodes", self.client.api.nodes)
            nodes = [self._node(attrs) for attrs in found]
            self._nodes = (time.monotonic(), nodes)
        return nodes

    def _node(self, attrs: dict[str, Any]) -> Node:
        spec, status, description = attrs.get("Spec", {}), attrs.get("Status", {}), attrs.get("Description", {})
        labels = spec.get("Labels") or {}
        name, value = self.node_label
        address = status.get("Addr", "")
        if address in ("", "0.0.0.0"):  # a manager reports its own this way; its advertise address is elsewhere
            address = attrs.get("ManagerStatus", {}).get("Addr", "").rsplit(":", 1)[0]
        return Node(
            id=attrs["ID"],
            hostname=description.get("Hostname", ""),
            address=address,
            public_host=labels.get(PUBLIC_HOST_LABEL) or address,
            state=status.get("State", "unknown"),
            availability="pause" if labels.get(PAUSED_LABEL) else spec.get("Availability", "active"),
            role=spec.get("Role", ""),
            labelled=labels.get(name) == value,
            memory=int(description.get("Resources", {}).get("MemoryBytes", 0)),
        )

    def set_availability(self, node_id: str, availability: str) -> None:
        """Make a node take new instances ("active") or not ("pause"). The portal's pause is a node
        label (PAUSED_LABEL), not Swarm's: on a node Swarm pauses, no task may start, so the jobs a
        drain runs there (a snapshot) and a restart of its servers could not either. "active" also
        ends a pause or drain of Swarm's own."""
        if availability not in ("active", "pause"):
            raise BackendError(f"A node's availability is active or pause, not {availability!r}.")
        node = self._docker("find the node", self.client.nodes.get, node_id)
        spec = node.attrs["Spec"]
        labels = {key: value for key, value in (spec.get("Labels") or {}).items() if key != PAUSED_LABEL}
        if availability == "pause":
            labels[PAUSED_LABEL] = "true"
        swarm_availability = "active" if availability == "active" else spec.get("Availability", "active")
        self._docker("change the node", node.update, spec | {"Labels": labels, "Availability": swarm_availability})
        self._nodes = (0.0, [])

    def others_reserve(self) -> dict[str, int]:
        """Node id -> the bytes of memory reserved there by tasks of services not of this portal."""
        tasks = self._docker("list its tasks", self.client.api.tasks, filters={"desired-state": "running"})
        ours = {service.id for service in self._services({})}
        reserved: dict[str, int] = {}
        for task in tasks:
            if task.get("ServiceID") in ours or not task.get("NodeID"):
                continue
            memory = task.get("Spec", {}).get("Resources", {}).get("Reservations", {}).get("MemoryBytes", 0)
            reserved[task["NodeID"]] = reserved.get(task["NodeID"], 0) + int(memory or 0)
        return reserved

    def place(self, needs: int, reserved: dict[str, int]) -> str:
        """The public host of the node a new server that reserves `needs` bytes goes on: the usable
        node with the most memory free. `reserved` is host -> the bytes this portal's instances of
        this backend reserve there. Raises NoRoom if none has room."""
        others = self.others_reserve()
        nodes = self.nodes(fresh=True)
        hosts = [node.public_host for node in nodes if node.labelled]
        if len(hosts) != len(set(hosts)):
            shared = sorted({host for host in hosts if hosts.count(host) > 1})
            raise BackendError(
                f"Two labelled nodes have the public host {', '.join(shared)}: an instance's host must name one "
                f"node. Ask an operator to give each its own {PUBLIC_HOST_LABEL} label."
            )
        usable = [node for node in nodes if node.usable]
        if not usable:
            raise NoRoom(
                f"No node of the swarm can take instances now: none is ready, active and labelled "
                f"{'='.join(self.node_label)}. Ask an operator to add or activate one."
            )
        free = {node.id: node.memory - reserved.get(node.public_host, 0) - others.get(node.id, 0) for node in usable}
        best = max(usable, key=lambda node: free[node.id])
        if free[best.id] < needs:
            raise NoRoom(
                f"No node has room for it: it needs {describe_size(needs)} of memory, and the most any of the "
                f"{len(usable)} usable nodes has free is {describe_size(max(free[best.id], 0))}. Stop or delete "
                "instances, choose smaller options, or ask an operator to add a node."
            )
        return best.public_host

    def _home(self, instance: "Instance") -> Node:
        """The node the instance's service is pinned to, else (a new instance) the usable node its
        host names."""
        service = self._service(instance)
        if service is not None and (pinned := self._pinned_to(service)):
            node = self.node_by_id(pinned)
            if node is None:
                raise BackendError("The node the instance's data is on has left the swarm.")
            return node
        for node in self.nodes(fresh=True):
            if node.public_host == instance.host and node.labelled:
                return node
        raise BackendError(f"No node of the swarm is {instance.host} any more; the instance cannot be placed.")

    def _node_for(self, instance: "Instance") -> Node:
        """The node whose address the portal reaches the instance's server at (no Docker call while
        the nodes' listing is current)."""
        for node in self.nodes():
            if node.public_host == instance.host:
                return node
        return self._home(instance)

    # Names and places -------------------------------------------------------------------

    def name(self, instance: "Instance") -> str:
        return f"stockroom-{self.portal_id[:12]}-{instance.kind}-{instance.pk}"

    def labels(self, instance: "Instance") -> dict[str, str]:
        return {
            f"{LABEL}.managed": "true",
            f"{LABEL}.portal": self.portal_id,
            f"{LABEL}.instance": str(instance.pk),
            f"{LABEL}.kind": instance.kind,
        }

    def folder(self, instance: "Instance", node: Node) -> PurePosixPath:
        """The instance's folder on `node`. Named after the node too: where nodes share a disk
        (as in the tests), a move never meets the folder it moves from."""
        return self.data_root / self.portal_id / node.id / f"{instance.kind}-{instance.pk}"

    def _job_folder(self, kind: str, number: int, node: Node) -> PurePosixPath:
        """An instance's folder on `node`, as a job there sees it."""
        return JOB_ROOT / self.portal_id / node.id / f"{kind}-{number}"

    def uid(self, instance: "Instance") -> int:
        return self.uid_base + instance.pk

    def layout(self, instance: "Instance", node: Node) -> Layout:
        assert instance.port is not None, "only an instance that holds a port has a service"
        layout = get_engine(instance.kind).container_layout(bind_address=node.address, port=instance.port)
        return replace(layout, admin_from=self.portal_address or None)

    # The contract -----------------------------------------------------------------------

    def create(self, instance: "Instance") -> None:
        self.destroy(instance)  # a clean slate, should the task run a second time
        node = self._home(instance)
        self._make_folder(instance, node)
        instance.mark("data_directory")
        layout = self.layout(instance, node)
        spec = get_engine(instance.kind).container(instance, layout)
        self._docker(
            "create the instance's service",
            self.client.services.create,
            self._image(instance.kind),
            **self._service_spec(instance, node, layout, spec, replicas=1),
        )
        self._wait_for_login(instance)

    def _service_spec(
        self, instance: "Instance", node: Node, layout: Layout, spec: Container, *, replicas: int, first: bool = True
    ) -> dict[str, Any]:
        """The keyword arguments of services.create (and update) for the instance's service. With
        `first` False its first-start files are blank: the server made its accounts already."""
        from docker.types import EndpointSpec, Resources, RestartPolicy, ServiceMode

        engine, uid = get_engine(instance.kind), self.uid(instance)
        mounts = self._server_mounts(instance, node, layout)
        files = {name: (path, text) for name, (path, text) in spec.files.items()}
        for name, text in spec.init_files.items():
            assert spec.init_dir is not None
            files[name] = (spec.init_dir / name, text if first else "")
        secrets_ = [self._secret(instance, name, path, text, uid) for name, (path, text) in files.items()]
        memory = engine.memory_limit(instance.options)
        return {
            "command": spec.command,
            "env": [f"{key}={value}" for key, value in spec.environment.items()],
            "name": self.name(instance),
            # Its port too: once the service is removed, the port is watched until its server let go.
            "labels": {**self.labels(instance), PORT: str(instance.port)},
            "container_labels": self.labels(instance),
            "constraints": [f"node.id=={node.id}"],
            "mode": ServiceMode("replicated", replicas=replicas),
            "networks": ["host"],
            "endpoint_spec": EndpointSpec(mode="dnsrr"),  # host networking: no virtual IP, no routing mesh
            "mounts": mounts,
            "secrets": secrets_,
            "user": f"{uid}:{uid}",
            "cap_drop": ["ALL"],
            "read_only": True,
            "resources": _limited(
                Resources(mem_limit=memory, mem_reservation=instance.memory_reservation or memory), engine.pids_limit
            ),
            # Not started again by Swarm, which would start it with the files of its last start by
            # the portal and lose the live changes since (its secrets cannot change): a server that
            # stopped is healed by the reconciler, which starts it with its options as they are.
            "restart_policy": RestartPolicy(condition="none"),
            "stop_grace_period": STOP_GRACE_NS,
        }

    def _secret(self, instance: "Instance", name: str, path: PurePosixPath, text: str, uid: int) -> Any:
        """A reference to a secret holding `text`, made if it does not exist, for the file at `path`
        (readable by the server's uid alone). A secret cannot be empty: an empty file is a newline."""
        from docker.types import SecretReference

        data = text or "\n"
        digest = hashlib.sha256(data.encode()).hexdigest()[:12]
        # Up to 64 of [A-Za-z0-9_.-]; the labels say whose it is.
        secret_name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"sr-{self.portal_id[:12]}-{instance.pk}-{name[:20]}-{digest}")
        found = self._docker("list secrets", self.client.secrets.list, filters={"name": secret_name})
        found = [secret for secret in found if secret.name == secret_name]
        if found:
            secret_id = found[0].id
        else:
            made = self._docker(
                "store a secret", self.client.secrets.create, name=secret_name, data=data, labels=self.labels(instance)
            )
            secret_id = made.id
        return SecretReference(secret_id, secret_name, filename=str(path), uid=str(uid), gid=str(uid), mode=0o400)

    def _forget_secrets(self, labels: dict[str, str], keep: frozenset[str] = frozenset()) -> None:
        """Remove the secrets labelled `labels` (an instance's) but those named in `keep` (the ones
        its service uses)."""
        wanted = [f"{key}={value}" for key, value in labels.items() if key != JOB]
        for secret in self._docker("list secrets", self.client.secrets.list, filters={"label": wanted}):
            if JOB in (secret.attrs["Spec"].get("Labels") or {}):
                continue  # a job's, which the job removes (or remove_orphan, if its worker died)
            if secret.name not in keep:
                self._docker("remove a secret", secret.remove)

    def stop(self, instance: "Instance") -> None:
        service = self._service(instance)
        if service is None:
            return
        self._docker("scale the service to nothing", service.scale, 0)
        self._wait(lambda: not self._running_tasks(instance), 45, "the server to stop")

    def start(self, instance: "Instance") -> None:
        if self._service(instance) is None:
            raise BackendError("The instance's service is gone; delete the instance and create a new one.")
        node = self._home(instance)
        if not node.state == "ready":
            raise BackendError(f"The server cannot start: {NODE_GONE.format(node=node.name, state=node.state)}.")
        # Its folder root's, and data, tmp and run the server's own folders, not links (a restore cut
        # short may have left it open to the uid's group): its mounts follow links.
        folder = self._job_folder(instance.kind, instance.pk, node)
        self._job(node, ["sh", "-c", SEAL, "seal", str(folder), str(self.uid(instance))],
                  what="check the instance's folder")  # fmt: skip
        layout = self.layout(instance, node)
        self._update(instance, node, layout, get_engine(instance.kind).container(instance, layout), first=False)

    def _update(self, instance: "Instance", node: Node, layout: Layout, spec: Container, *, first: bool) -> None:
        """Run the instance's service (again) with `spec`'s files, as new secrets where they changed;
        return once a login works. Its secrets of earlier starts go."""
        service = self._service(instance)
        if service is None:
            raise BackendError("The instance's service is gone; delete the instance and create a new one.")
        kwargs = self._service_spec(instance, node, layout, spec, replicas=1, first=first)
        kwargs.pop("name")
        self._docker("start the service", service.update, image=self._image(instance.kind), **kwargs)
        self._wait_for_login(instance)
        in_use = frozenset(ref["SecretName"] for ref in self._secret_refs(instance))
        self._forget_secrets(self.labels(instance), keep=in_use)

    def restart(self, instance: "Instance") -> None:
        self.stop(instance)
        self.start(instance)

    def _secret_refs(self, instance: "Instance") -> list[dict[str, Any]]:
        service = self._service(instance)
        if service is None:
            return []
        return list(service.attrs["Spec"]["TaskTemplate"]["ContainerSpec"].get("Secrets") or [])

    def set_password(self, instance: "Instance", password: str) -> None:
        with self.admin(instance) as admin:
            get_engine(instance.kind).set_password(instance, password, admin=admin, write=None)

    def server_version(self, instance: "Instance") -> str:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).server_version(instance, admin)

    _versions: dict[tuple[str, str], tuple[float, str]] = {}  # (image, kind): one image may hold both kinds

    def host_version(self, kind: str) -> str:
        engine, image = get_engine(kind), self._image(kind)
        asked, version = self._versions.get((image, kind), (0.0, ""))
        if time.monotonic() - asked > 600:
            usable = [node for node in self.nodes() if node.usable]
            if not usable:
                raise BackendError("No node of the swarm is usable to ask its image for a version.")
            argv = [engine.version_program, "--version"]
            output = self._job(usable[0], argv, what="read the server's version", image=image, as_root=False)
            version = engine.program_version(output)
            self._versions[image, kind] = (time.monotonic(), version)
        return version

    @contextmanager
    def admin(self, instance: "Instance") -> Iterator[Endpoint]:
        """The server at its node's address, over TLS always (its certificate checked against the
        portal's CA): the portal's account, which takes TLS logins from the portal's address alone."""
        yield self.portal_endpoint(instance)

    def client_connections(self, instance: "Instance") -> int:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).client_connections(instance, admin=admin)

    def login_endpoint(self, instance: "Instance") -> Endpoint:
        assert instance.port is not None, "only an instance that holds a port has a server"
        tls = ca_of(instance) if get_engine(instance.kind).tls(instance) != TLS_OFF else None
        return Endpoint(self._node_for(instance).address, instance.port, tls_ca=tls)

    def portal_endpoint(self, instance: "Instance") -> Endpoint:
        """Where the portal logs in to the server, over TLS (`Engine.portal_port`)."""
        node = self._node_for(instance)
        port = get_engine(instance.kind).portal_port(instance, self.layout(instance, node))
        return Endpoint(node.address, port, tls_ca=ca_of(instance))

    def checked_login_endpoint(self, instance: "Instance") -> Endpoint:
        # The listener is on another host, whose processes the portal cannot see: the server proves
        # itself with its certificate before the user's password is sent, over the portal's TLS.
        return self.portal_endpoint(instance)

    def holds_port(self, instance: "Instance") -> bool:
        return bool(self._running_tasks(instance))

    def port_is_free(self, port: int) -> bool:
        # Ports are unique per node by the portal's own records (one host per node): nothing but
        # this portal's services listen on a node's database ports.
        return True

    def why_down(self, instance: "Instance") -> str | None:
        try:
            node = self._home(instance)
        except BackendError as exc:
            return str(exc).rstrip(".")
        if node.state != "ready":
            return NODE_GONE.format(node=node.hostname or node.public_host, state=node.state)  # users read it
        # Its newest task, ended or not: Swarm starts no other (the reconciler does), so the last
        # one says why it stopped (an out-of-memory kill is exit code 137).
        service = self._service(instance)
        tasks = self._tasks_of(service.id) if service is not None else []
        if not tasks:
            return None
        status = tasks[0]["Status"]
        code = status.get("ContainerStatus", {}).get("ExitCode")
        said = f"Swarm says: {status['Err']}" if status.get("Err") else ""
        if status["State"] in ENDED and code:
            said = f"{said} (exit code {code})" if said else f"Its server exited with code {code}"
        return said or None

    def unreachable(self, instance: "Instance") -> str | None:
        """Why the instance's node is out of reach (Swarm no longer reports it ready), or None."""
        try:
            node = self._node_for(instance)
        except BackendError as exc:
            return str(exc).rstrip(".")
        if node.state == "ready":
            return None
        return NODE_GONE.format(node=node.hostname or node.public_host, state=node.state)  # users read it

    def destroy(self, instance: "Instance") -> None:
        service = self._service(instance)
        if service is not None:
            self._remove_service(service)
        else:  # a create cut short before its service was made may have left the folder
            node = next((n for n in self.nodes(fresh=True) if n.public_host == instance.host and n.labelled), None)
            if node is not None:
                self._remove_folder(instance, node, what="remove the instance's folder")
        self._forget_secrets(self.labels(instance))

    def _remove_service(self, service: Any) -> None:
        """Remove an instance's service, and once its server has stopped, its folder on its node. On
        a node that is not ready nothing can be waited for: its folder stays, and is logged."""
        labels = service.attrs["Spec"].get("Labels", {})
        node = self.node_by_id(self._pinned_to(service))
        self._docker("remove the instance's service", service.remove)
        kind, number = labels.get(f"{LABEL}.kind", ""), labels.get(f"{LABEL}.instance", "")
        if node is not None and node.state != "ready":
            logger.warning("The folder of %s instance %s stays on node %s, which is %s: remove %s there",
                           kind, number, node.name, node.state,
                           self.data_root / self.portal_id / node.id / f"{kind}-{number}")  # fmt: skip
            return
        self._wait(lambda: not self._live(self._tasks_of(service.id)), 45, "the server to stop")
        if node is not None and labels.get(PORT, "").isdigit():
            # Swarm forgets a removed service's tasks at once, while its server may still be
            # stopping: the port is free (for the next server there) once nothing answers on it.
            self._wait_port_free(node, int(labels[PORT]))
        if node is not None and kind and number.isdigit():
            self._job(node, ["rm", "-rf", "--", str(self._job_folder(kind, int(number), node))],
                      what="remove the instance's folder")  # fmt: skip

    def _wait_port_free(self, node: Node, port: int) -> None:
        def refused() -> bool:
            try:
                socket.create_connection((node.address, port), timeout=1).close()
            except ConnectionRefusedError:
                return True
            except OSError:
                return False
            return False

        self._wait(refused, STOP_GRACE_NS / 10**9 + 15, f"port {port} on {node.name} to be free")

    def check(self) -> str:
        nodes = self.nodes(fresh=True)
        usable = [node for node in nodes if node.usable]
        found = f"Docker Swarm at {self.manager_url}: {len(nodes)} nodes, {len(usable)} taking instances."
        if not self.portal_address:
            raise BackendError(f"{found} SWARM_PORTAL_ADDRESS is not set: the portal cannot administer servers.")
        return f"{found} Disk limits are not enforced on this backend yet."

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        """Services labelled for this portal of no instance it knows, and jobs older than any job
        may run (their worker died): a job's end removes it otherwise."""
        found = {}
        oldest = datetime.now(UTC) - timedelta(seconds=settings.STOCKROOM_TASK_TIME_LIMIT + self.job_timeout)
        for service in self._services({}):
            labels = service.attrs["Spec"].get("Labels", {})
            instance = labels.get(f"{LABEL}.instance", "")
            if JOB in labels:
                created = datetime.fromisoformat(service.attrs["CreatedAt"][:19]).replace(tzinfo=UTC)  # to the second
                if created < oldest:
                    found[service.name] = f"Swarm job of instance {instance or '?'} left by a worker that stopped."
            elif not instance.isdigit() or int(instance) not in known_ids:
                found[service.name] = f"Swarm service of {labels.get(f'{LABEL}.kind', '?')} instance {instance or '?'}."
        return found

    def remove_orphan(self, key: str) -> None:
        for service in self._services({}):
            if service.name != key:
                continue
            if JOB in service.attrs["Spec"].get("Labels", {}):
                self._docker("remove a job", service.remove)
                wanted = [f"{LABEL}.portal={self.portal_id}", f"{JOB}=true"]
                for secret in self._docker("list secrets", self.client.secrets.list, filters={"label": wanted}):
                    self._gone(secret)  # a job's that ended; one still in use stays
            else:
                self._remove_service(service)
                self._forget_secrets(service.attrs["Spec"]["Labels"])

    # Snapshots and restores ---------------------------------------------------------------

    @contextmanager
    def _beside(self, instance: "Instance") -> Iterator[DockerBeside]:
        """Programs beside the running server, each a job on its node with the server's own mounts
        (its socket's folder too), as its uid; the portal's clients at the node's address."""
        node = self._home(instance)
        layout = self.layout(instance, node)
        mounts = self._server_mounts(instance, node, layout)
        execute = partial(self._beside_job, instance, node, mounts)
        yield DockerBeside(layout=layout, endpoint=self.portal_endpoint(instance), execute=execute)

    def restore(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        node = self._home(instance)
        layout = self.layout(instance, node)
        self.stop(instance)
        self._fill(instance, node, layout, snapshot, replay)
        self._start_restored(instance, node, layout)

    def _fill(
        self, instance: "Instance", node: Node, layout: Layout, snapshot: IO[bytes], replay: Replay | None,
        *, opened: bool = False,
    ) -> None:  # fmt: skip
        """Put `snapshot` (and `replay`) in place of the data in the instance's folder on `node`, its
        server stopped: the engine's restore, in jobs there that have the folder whole, where the
        uid's group may write meanwhile (to put a new `data` in place of the old). Root's alone again
        after, `data`, `tmp` and `run` checked to be the uid's folders and not links: the server's
        mounts are made from those paths, and follow a link. `opened`: _make_folder opened it."""
        from docker.types import Mount

        folder, uid = self._job_folder(instance.kind, instance.pk, node), self.uid(instance)
        if not opened:
            self._job(node, ["sh", "-c", OPEN, "open", str(folder), str(uid)],
                      what="open the instance's folder to its restore")  # fmt: skip
        try:
            data = HELPER_DISK / "data"
            helper = replace(layout, data=data, tmp=data if layout.tmp == layout.data else HELPER_DISK / "tmp")
            mounts = [
                Mount(str(HELPER_DISK), str(self.folder(instance, node)), type="bind"),
                Mount("/tmp", None, type="tmpfs", tmpfs_size=64 * 2**20, tmpfs_mode=0o1777),
            ]
            execute = partial(self._beside_job, instance, node, mounts)
            get_engine(instance.kind).restore(instance, DockerBeside(layout=helper, endpoint=None, execute=execute),
                                              snapshot, replay)  # fmt: skip
        finally:
            self._job(node, ["sh", "-c", SEAL, "seal", str(folder), str(uid)], what="check the instance's folder")

    def _start_restored(self, instance: "Instance", node: Node, layout: Layout) -> None:
        """Start restored data as at its first start: the accounts made again from the instance's own
        credentials; then with its usual files, if its first-start files are not for every start."""
        engine = get_engine(instance.kind)
        restored, usual = engine.container_restored(instance, layout), engine.container(instance, layout)
        if self._service(instance) is None:
            self._docker("create the instance's service", self.client.services.create, self._image(instance.kind),
                         **self._service_spec(instance, node, layout, restored, replicas=1))  # fmt: skip
            self._wait_for_login(instance)
        else:
            self._update(instance, node, layout, restored, first=True)
        if restored != usual:
            self._update(instance, node, layout, usual, first=False)

    # Moves between nodes ------------------------------------------------------------------

    def move(self, instance: "Instance", source: tuple[str, int], spool: IO[bytes]) -> float:
        """Move the running server at `source` (host, port) to `instance.host` and `instance.port`,
        a usable node's, with its data: its writes refused, a snapshot streamed into `spool` (the
        portal's storage) by a job on its node, its server stopped, then the snapshot restored into
        a new folder on the new node and started there; the old folder is removed last. Returns the
        seconds writes were refused. If anything fails before the new server answers, the old one
        runs again on its node, with its data, and the error is raised."""
        old = copy.copy(instance)
        old.host, old.port = source
        old_node, new_node = self._home(old), self._placed(instance)
        if old_node.id == new_node.id:
            raise BackendError("The instance is on that node already.")
        engine = get_engine(instance.kind)
        # The new folder first, ready for the restore: it needs nothing of the old server's, so
        # its job is not part of the pause.
        self._make_folder(instance, new_node, to_restore=True)
        try:
            with self.admin(old) as admin:
                engine.refuse_writes(old, True, admin=admin)
            refused = time.monotonic()
            try:
                self.snapshot(old, spool)
            except Exception:
                self._accept_writes(old, old_node)
                raise
        except Exception:
            self._remove_folder(instance, new_node, what="remove the failed move's folder")
            raise
        try:
            self.stop(old)
            service = self._service(old)
            if service is not None:  # the new one has its name
                self._docker("remove the old service", service.remove)
                self._wait(lambda: not self._live(self._tasks_of(service.id)), 45, "the old server to stop")
            spool.seek(0)
            layout = self.layout(instance, new_node)
            self._fill(instance, new_node, layout, spool, None, opened=True)
            self._start_restored(instance, new_node, layout)
        except Exception:
            logger.exception("Instance %s: the move to %s failed; starting it on %s again", instance.pk,
                             new_node.name, old_node.name)  # fmt: skip
            self._back_home(old, old_node, new_node)
            raise
        paused = time.monotonic() - refused
        try:
            self._remove_folder(instance, old_node, what="remove the instance's old folder")
        except BackendError:  # the move is done; what is left is an old folder, not the instance
            logger.exception("Instance %s moved, but its old folder on %s stays", instance.pk, old_node.name)
        return paused

    def _accept_writes(self, old: "Instance", node: Node) -> None:
        """After a failed snapshot of a move: the server takes writes again, or, if it cannot be
        told, is started again (the refusal is a setting of the running server's only)."""
        try:
            with self.admin(old) as admin:
                get_engine(old.kind).refuse_writes(old, False, admin=admin)
        except Exception:
            logger.exception("Instance %s: writes could not be accepted again; restarting it", old.pk)
            self._restart_old(old, node)

    def _back_home(self, old: "Instance", old_node: Node, new_node: Node) -> None:
        """After a failed move: the new service and folder gone, the old server running again on its
        own folder (never removed before the new server answered)."""
        service = self._service(old)
        if service is not None and self._pinned_to(service) == new_node.id:
            self._remove_service(service)  # its folder too
            service = None
        else:  # made before the old server stopped (see move)
            self._remove_folder(old, new_node, what="remove the failed move's folder")
        self._restart_old(old, old_node, service)

    def move_made(self, instance: "Instance") -> bool:
        """Whether the instance's service is pinned to the node its host names: a move made it there.
        (Before that, the service is the old one, pinned to the old node, or gone.)"""
        service = self._service(instance)
        return service is not None and self._pinned_to(service) == self._placed(instance).id

    def end_move(self, instance: "Instance", *, source: tuple[str, int], target: tuple[str, int], moved: bool) -> None:
        """After a move cut short by its worker's death: `moved`, the old folder goes; else the new
        service and folder go, and the server at `source` runs again from its own folder, which a
        move removes only once the new server answered."""
        old, new = copy.copy(instance), copy.copy(instance)
        (old.host, old.port), (new.host, new.port) = source, target
        old_node = self._placed(old)
        if moved:
            self._remove_folder(instance, old_node, what="remove the instance's old folder")
        else:
            self._back_home(old, old_node, self._placed(new))

    def _restart_old(self, old: "Instance", node: Node, service: Any = None) -> None:
        """The old server running on `node` from its own folder: its service started again, or made
        again if it was removed."""
        layout = self.layout(old, node)
        spec = get_engine(old.kind).container(old, layout)
        service = service or self._service(old)
        if service is None:  # removed by the move: its server may still be stopping
            assert old.port is not None, "a moved instance holds a port"
            self._wait_port_free(node, old.port)
        if service is not None:
            self._docker("stop the old service", service.scale, 0)
            self._wait(lambda: not self._running_tasks(old), 45, "the old server to stop")
            self._update(old, node, layout, spec, first=False)
            return
        self._docker("create the old service again", self.client.services.create, self._image(old.kind),
                     **self._service_spec(old, node, layout, spec, replicas=1, first=False))  # fmt: skip
        self._wait_for_login(old)

    def rebuild(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        """Make the server again on `instance.host` and `instance.port` from `snapshot`, its old node
        out of reach (an evacuation): the old service goes (Swarm stops its server if the node comes
        back); its old folder stays on that node until an operator removes it."""
        node = self._placed(instance)
        service = self._service(instance)
        old_spec = service.attrs["Spec"] if service is not None else None
        if service is not None:
            self._docker("remove the old service", service.remove)
        try:
            self._make_folder(instance, node, to_restore=True)
            layout = self.layout(instance, node)
            self._fill(instance, node, layout, snapshot, replay, opened=True)
            self._start_restored(instance, node, layout)
        except Exception:
            # The new one gone; the old service made again as it was: Swarm starts it on its node,
            # with the data there, if the node comes back.
            new = self._service(instance)
            if new is not None:
                self._remove_service(new)
            else:
                self._remove_folder(instance, node, what="remove the failed evacuation's folder")
            if old_spec is not None:
                self._docker("make the old service again", self.client.api.create_service, old_spec["TaskTemplate"],
                             name=old_spec["Name"], labels=old_spec.get("Labels"), mode=old_spec.get("Mode"),
                             endpoint_spec=old_spec.get("EndpointSpec"))  # fmt: skip
            raise

    def _placed(self, instance: "Instance") -> Node:
        """The usable node `instance.host` names (where a move or a rebuild puts it)."""
        for node in self.nodes(fresh=True):
            if node.public_host == instance.host and node.labelled:
                return node
        raise BackendError(f"No node of the swarm is {instance.host}.")

    def _server_mounts(self, instance: "Instance", node: Node, layout: Layout) -> list[Any]:
        """The server's bind mounts: its data, its temporary files and its socket's folder."""
        from docker.types import Mount

        folder = self.folder(instance, node)
        mounts = [Mount(str(layout.data), str(folder / "data"), type="bind")]
        if layout.tmp != layout.data:
            mounts.append(Mount(str(layout.tmp), str(folder / "tmp"), type="bind"))
        # On the node, not in memory: a job beside the server (a snapshot) reaches its socket there.
        mounts.append(Mount(str(layout.socket.parent), str(folder / "run"), type="bind"))
        return mounts

    def _beside_job(
        self,
        instance: "Instance",
        node: Node,
        mounts: list[Any],
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        """Run `argv` in a job on `node` beside the instance's server: as its uid, with its image,
        its memory limit and `mounts` (see `_connected_job`)."""
        self._connected_job(
            node,
            argv,
            image=self._image(instance.kind),
            uid=self.uid(instance),
            memory=get_engine(instance.kind).memory_limit(instance.options),
            labels=self.labels(instance),
            mounts=mounts,
            stdin=stdin,
            stdout=stdout,
            secret=secret,
        )

    def _connected_job(
        self,
        node: Node,
        argv: Sequence[str],
        *,
        image: str,
        uid: int,
        memory: int,
        labels: dict[str, str],
        mounts: list[Any],
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        """Run `argv` in a job on `node` as `uid`, with no capability, a read-only root, `mounts` and
        a `memory` limit. It connects back to the portal (CONNECT_BACK): its standard input and output
        are that connection, which it opens with a one-time token; `{secret}` in `argv` is a Swarm
        secret's file, in the job's memory. Raises BackendError with the end of its error output."""
        from docker.types import Resources, RestartPolicy

        name = PurePosixPath(argv[0]).name
        token = secrets.token_hex(32)
        labels = {**labels, JOB: "true"}
        made: list[Any] = []
        references = [self._job_secret(made, labels, uid, "token", token + "\n", TOKEN_FILE)]
        if secret is not None:
            references.append(self._job_secret(made, labels, uid, "options", secret, SECRET_FILE))
            argv = [arg.replace("{secret}", str(SECRET_FILE)) for arg in argv]
        with socket.create_server((self.portal_address, 0)) as listener:
            service = self._docker(
                f"start {name} on node {node.name}",
                self.client.services.create,
                image,
                command=["bash"],
                args=["-c", CONNECT_BACK, name, self.portal_address, str(listener.getsockname()[1]), *argv],
                name=f"stockroom-job-{self.portal_id[:12]}-{secrets.token_hex(4)}",
                labels=labels,
                constraints=[f"node.id=={node.id}"],
                mounts=mounts,
                secrets=references,
                user=f"{uid}:{uid}",
                cap_drop=["ALL"],
                read_only=True,
                networks=["host"],
                resources=_limited(Resources(mem_limit=memory), JOB_PIDS),
                restart_policy=RestartPolicy(condition="none"),
            )
            try:
                self._stream(service, listener, token, stdin, stdout, what=name, peer=node.address)
                self._ended(service, name)
            finally:
                self._docker(f"remove the job of {name}", service.remove)
                for each in made:  # removed once the job's task has let go of it
                    self._wait(partial(self._gone, each), 30, "the job to let go of its secret")

    def _job_secret(
        self, made: list[Any], labels: dict[str, str], uid: int, name: str, text: str, path: PurePosixPath
    ) -> Any:
        from docker.types import SecretReference

        secret = self._docker(
            "store a job's secret",
            self.client.secrets.create,
            name=f"sr-{self.portal_id[:12]}-job-{name}-{secrets.token_hex(8)}",
            data=text,
            labels=labels,
        )
        made.append(secret)
        return SecretReference(secret.id, secret.name, filename=str(path), uid=str(uid), gid=str(uid), mode=0o400)

    # Exports and verifies ------------------------------------------------------------------

    def export_snapshot(self, kind: str, snapshot: IO[bytes], out: IO[bytes], *, database: str) -> None:
        with self._scratch(kind) as scratch:
            get_engine(kind).export(snapshot, scratch, out, database=database)

    def verify_snapshot(self, kind: str, snapshot: IO[bytes], *, database: str) -> str:
        with self._scratch(kind) as scratch:
            return get_engine(kind).verify(snapshot, scratch, database=database)

    @contextmanager
    def _scratch(self, kind: str) -> Iterator["SwarmScratch"]:
        """A throwaway folder on a usable node, of a uid no instance has (`uid_base` - 1), and jobs
        there as that uid, which have it and nothing else of the node's: where a snapshot, which may
        hold anything its tenant put there, is loaded and checked. Removed afterwards."""
        usable = [node for node in self.nodes(fresh=True) if node.usable]
        if not usable:
            raise BackendError("No node of the swarm is usable for a throwaway server now.")
        node, uid = usable[0], self.uid_base - 1
        folder = JOB_ROOT / self.portal_id / node.id / f"scratch-{secrets.token_hex(8)}"
        self._job(node, ["sh", "-c", 'umask 077; mkdir -p -- "$1" && chown -- "$2:$2" "$1"', "make", str(folder),
                         str(uid)], what="make a throwaway folder")  # fmt: skip
        try:
            from docker.types import Mount

            source = self.data_root / folder.relative_to(JOB_ROOT)
            mounts = [
                Mount(str(SCRATCH), str(source), type="bind"),
                Mount("/tmp", None, type="tmpfs", tmpfs_size=64 * 2**20, tmpfs_mode=0o1777),
            ]
            labels = {f"{LABEL}.managed": "true", f"{LABEL}.portal": self.portal_id}
            run = partial(self._connected_job, node, image=self._image(kind), uid=uid, memory=SCRATCH_MEMORY,
                          labels=labels, mounts=mounts)  # fmt: skip
            yield SwarmScratch(folder=SCRATCH, execute=run)
        finally:
            self._job(node, ["rm", "-rf", "--", str(folder)], what="remove a throwaway folder")

    @staticmethod
    def _gone(secret: Any) -> bool:
        """Remove the secret; False while a task still holds it (Swarm refuses then)."""
        import docker.errors

        try:
            secret.remove()
        except docker.errors.NotFound:
            return True
        except docker.errors.APIError:
            return False
        return True

    def _stream(
        self, service: Any, listener: socket.socket, token: str, stdin: IO[bytes] | None, stdout: IO[bytes] | None,
        *, what: str, peer: str,
    ) -> None:  # fmt: skip
        """Take the job's connection (the first from `peer`, its node's address, that opens with
        `token` within a second), send it `stdin` and copy what it writes to `stdout`, until it
        closes it. Any other connection is closed unheard."""
        deadline = time.monotonic() + self.job_timeout
        listener.settimeout(0.5)
        while True:
            if time.monotonic() > deadline:
                return  # _ended says why
            try:
                connection, (address, *_port) = listener.accept()
            except TimeoutError:
                if self._failed(service):
                    return
                continue
            said = b""
            if address == peer:
                connection.settimeout(1)
                with suppress(OSError):
                    said = connection.recv(len(token) + 1)
            if hmac.compare_digest(said, (token + "\n").encode()):
                break
            connection.close()  # not the job's
        with connection:
            connection.settimeout(settings.STOCKROOM_TASK_TIME_LIMIT)
            feeder = threading.Thread(target=_feed, args=(stdin, connection), daemon=True)
            feeder.start()
            try:
                while chunk := connection.recv(1024 * 1024):
                    if stdout is not None:
                        stdout.write(chunk)
            except OSError as exc:
                raise BackendError(f"The connection from {what} on its node broke: {exc}.") from exc
            finally:
                feeder.join(timeout=5)

    def _failed(self, service: Any) -> bool:
        return any(task["Status"]["State"] in ("failed", "rejected") for task in self._tasks_of(service.id))

    def _ended(self, service: Any, name: str) -> None:
        """Wait for the job's end; raise BackendError with its error output unless it succeeded."""
        deadline = time.monotonic() + 60
        while True:
            tasks = self._tasks_of(service.id)
            states = {task["Status"]["State"] for task in tasks}
            if "complete" in states:
                return
            if states & {"failed", "rejected"} or time.monotonic() > deadline:
                task = tasks[0] if tasks else {"Status": {}}
                status = int(task["Status"].get("ContainerStatus", {}).get("ExitCode", -1) or -1)
                try:
                    errors = b"".join(service.logs(stdout=False, stderr=True, tail=40))
                except Exception:  # noqa: BLE001 - the task's own word is enough
                    errors = b""
                raise helper_failed(name, errors or task["Status"].get("Err", "").encode(), status)
            time.sleep(self.poll_interval)

    # Jobs on a node ---------------------------------------------------------------------

    def _make_folder(self, instance: "Instance", node: Node, *, to_restore: bool = False) -> None:
        """A new, empty folder for the instance on `node`; `to_restore`: opened to a restore there
        too (see _fill), in the same job."""
        script = MAKE + (f"; {OPEN}" if to_restore else "")
        folder = self._job_folder(instance.kind, instance.pk, node)
        self._job(node, ["sh", "-c", script, "make", str(folder), str(self.uid(instance))],
                  what="make the instance's folder")  # fmt: skip

    def _remove_folder(self, instance: "Instance", node: Node, *, what: str) -> None:
        self._job(node, ["rm", "-rf", "--", str(self._job_folder(instance.kind, instance.pk, node))], what=what)

    def _job(self, node: Node, argv: list[str], *, what: str, image: str = "", as_root: bool = True) -> str:
        """Run `argv` once on `node`: as root, with the nodes' data root at JOB_ROOT, or else as
        nobody, with nothing of the node's; its output. `image` is by default any of the kinds'
        (each has a shell and coreutils). Raises BackendError if it fails, or does not end within
        `job_timeout` s (its node down)."""
        from docker.types import Mount, RestartPolicy

        image = image or self._image(self._kinds()[0])
        labels = {f"{LABEL}.managed": "true", f"{LABEL}.portal": self.portal_id, JOB: "true"}
        service = self._docker(
            f"start a job to {what}",
            self.client.services.create,
            image,
            command=argv[:1],
            args=argv[1:],
            name=f"stockroom-job-{self.portal_id[:12]}-{secrets.token_hex(4)}",
            labels=labels,
            constraints=[f"node.id=={node.id}"],
            mounts=[Mount(str(JOB_ROOT), str(self.data_root), type="bind")] if as_root else [],
            user="0:0" if as_root else f"{NOBODY}:{NOBODY}",
            read_only=not as_root,
            cap_drop=None if as_root else ["ALL"],
            networks=["host"],
            restart_policy=RestartPolicy(condition="none"),
        )
        try:
            deadline = time.monotonic() + self.job_timeout
            while True:
                tasks = self._tasks_of(service.id)
                states = [task["Status"]["State"] for task in tasks]
                if "complete" in states:
                    return b"".join(service.logs(stdout=True, stderr=False)).decode(errors="replace")
                if {"failed", "rejected"} & set(states):
                    err = next(task["Status"].get("Err", "") for task in tasks)
                    output = b"".join(service.logs(stdout=True, stderr=True)).decode(errors="replace").strip()
                    raise BackendError(f"Could not {what} on node {node.name}: {output or err}.")
                if time.monotonic() > deadline:
                    raise BackendError(
                        f"Could not {what} on node {node.name}: the job did not end within "
                        f"{self.job_timeout:g} s ({NODE_GONE.format(node=node.name, state=node.state)}?)."
                    )
                time.sleep(self.poll_interval)
        finally:
            self._docker(f"remove the job to {what}", service.remove)

    @staticmethod
    def _kinds() -> list[str]:
        from ..engines import engines

        return list(engines())

    # Helpers ----------------------------------------------------------------------------

    def _image(self, kind: str) -> str:
        return self.images.get(kind) or get_engine(kind).image

    def _services(self, labels: dict[str, str]) -> list[Any]:
        wanted = {f"{LABEL}.managed": "true", f"{LABEL}.portal": self.portal_id, **labels}
        filters = {"label": [f"{key}={value}" for key, value in wanted.items()]}
        return list(self._docker("list services", self.client.services.list, filters=filters))

    def _service(self, instance: "Instance") -> Any | None:
        found = self._services({f"{LABEL}.instance": str(instance.pk), f"{LABEL}.kind": instance.kind})
        found = [service for service in found if JOB not in service.attrs["Spec"].get("Labels", {})]
        return found[0] if found else None

    @staticmethod
    def _pinned_to(service: Any) -> str:
        """The id of the node a service is pinned to ("" if none)."""
        constraints = service.attrs["Spec"]["TaskTemplate"].get("Placement", {}).get("Constraints", [])
        return next((c.split("==", 1)[1] for c in constraints if c.startswith("node.id==")), "")

    @staticmethod
    def _live(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The tasks that are meant to run or still do."""
        states = ("new", "pending", "assigned", "accepted", "preparing", "starting", "running")
        return [task for task in tasks if task["Status"]["State"] in states]

    def _tasks_of(self, service_id: str) -> list[dict[str, Any]]:
        """A service's tasks, newest first; none once the service is gone."""
        import docker.errors

        try:
            tasks = self._docker("list tasks", self.client.api.tasks, filters={"service": service_id})
        except BackendError as exc:
            if isinstance(exc.__cause__, docker.errors.NotFound):
                return []
            raise
        return sorted(tasks, key=_updated, reverse=True)

    def _tasks(self, instance: "Instance") -> list[dict[str, Any]]:
        """The instance's service's tasks that are meant to run or still do, newest first."""
        service = self._service(instance)
        return [] if service is None else self._live(self._tasks_of(service.id))

    def _running_tasks(self, instance: "Instance") -> list[dict[str, Any]]:
        return [task for task in self._tasks(instance) if task["Status"]["State"] == "running"]

    def _wait(self, done: Callable[[], bool], seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                raise BackendError(f"Timed out after {seconds:g} s waiting for {what}.")
            time.sleep(self.poll_interval)

    def _wait_for_login(self, instance: "Instance") -> None:
        def exited() -> bool:
            service = self._service(instance)
            if service is None:
                return True
            tasks = self._tasks_of(service.id)
            return bool(tasks) and tasks[0]["Status"]["State"] in ENDED

        self.wait_for_login(instance, exited=exited, log_tail=lambda: self._log_tail(instance))

    def _log_tail(self, instance: "Instance", lines: int = 3) -> str:
        service = self._service(instance)
        if service is None:
            return "Its service is gone."
        tasks = self._tasks_of(service.id)
        err = tasks[0]["Status"].get("Err", "") if tasks else ""
        try:
            text = b"".join(service.logs(stdout=True, stderr=True, tail=lines)).decode(errors="replace").strip()
        except Exception:  # noqa: BLE001 - a missing log must not hide the real error
            text = ""
        said = f"Swarm says: {err}. " if err else ""
        return f"{said}Server log: {' | '.join(text.splitlines())}" if text else f"{said}The server log is empty."


def _limited(resources: Any, pids: int) -> Any:
    """`resources` (the SDK's) with a limit on the task's processes too: Docker's API has had it
    since 1.41 (Docker 20.10), which the SDK does not know yet."""
    resources.setdefault("Limits", {})["Pids"] = pids
    return resources


def _updated(task: dict[str, Any]) -> tuple[str, str]:
    """When a task last changed, in an order that sorts: Docker's stamps are UTC with 0 to 9
    digits of a second's fraction ("…:05Z" before "…:05.2Z" as text would not be)."""
    whole, _, fraction = task.get("UpdatedAt", "").rstrip("Z").partition(".")
    return whole, fraction.ljust(9, "0")


def _feed(source: IO[bytes] | None, sink: socket.socket) -> None:
    """Copy `source` to a job's standard input, then close that; a job that stops reading ends it."""
    with suppress(OSError):
        while source is not None and (chunk := source.read(1024 * 1024)):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)


@dataclass(frozen=True)
class SwarmScratch(Relay):
    """What an engine's export and verify run in (`Scratch`): a throwaway folder on a node, and jobs
    there that have it."""

    folder: PurePosixPath
    execute: Callable[..., None]
