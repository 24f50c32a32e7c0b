"""The fleet: the nodes of every backend that places servers on many hosts (the swarm), as
operators see them in the admin and the API, and pausing or activating one.

A node's numbers are the backend's (state, availability, memory) beside the portal's own (what its
live instances there reserve, and how many there are), joined by host: an instance of such a
backend has its node's public host as its `host`. A backend whose manager does not answer gives an
error row, never an exception: the others' nodes still show.
"""

import logging
from dataclasses import dataclass

from django.conf import settings
from django.db.models import Count, Sum

from ..backends.base import BackendError, BaseBackend, Node, get_backend
from ..models import RESERVING_MEMORY, Instance
from ..options import describe_size
from . import moves

logger = logging.getLogger(__name__)

# What an operator may do to a node here -> the availability it sets. A drain pauses it, and then
# moves each running instance of the portal's off it, with its data (services/moves.py).
ACTIONS = {"activate": "active", "pause": "pause", "drain": "pause"}


class UnknownNode(Exception):
    """No backend that places servers has a node of that id (404)."""


class FleetUnavailable(Exception):
    """A backend's manager could not be asked, or refused (503); the message says which and why."""


@dataclass(frozen=True)
class NodeRow:
    """One node, or (`error` set, the rest blank) a backend whose nodes could not be listed."""

    backend: str
    id: str = ""
    hostname: str = ""
    address: str = ""
    public_host: str = ""
    state: str = ""
    availability: str = ""
    role: str = ""
    labelled: bool = False
    memory: int = 0  # bytes, the node's total
    reserved: int = 0  # bytes reserved there by the portal's instances whose servers run or may run
    instances: int = 0  # the portal's live instances there
    error: str = ""

    @property
    def memory_text(self) -> str:
        """Reserved of total, for people: "1.2 GiB of 23.5 GiB"."""
        return f"{describe_size(self.reserved)} of {describe_size(self.memory)}"


def placing_backends() -> list[BaseBackend]:
    """The configured backends that place servers on many hosts (none asks its manager anything)."""
    found = []
    for alias in settings.STOCKROOM_BACKENDS:
        try:
            backend = get_backend(alias)
        except BackendError:  # misconfigured: its own checks (/healthz) say so
            continue
        if backend.places:
            found.append(backend)
    return found


def nodes() -> list[NodeRow]:
    """Every node of every placing backend, in the backends' order, each backend's by hostname;
    an error row for a backend that could not list them."""
    backends = placing_backends()
    held = _held([backend.alias for backend in backends])
    rows: list[NodeRow] = []
    for backend in backends:
        try:
            listed = backend.nodes(fresh=True)
        except BackendError as exc:
            rows.append(NodeRow(backend=backend.alias, error=str(exc)))
            continue
        rows += [_row(backend.alias, node, held) for node in sorted(listed, key=lambda node: (node.hostname, node.id))]
    return rows


def _held(aliases: list[str]) -> dict[tuple[str, str], tuple[int, int]]:
    """(backend, host) -> (live instances, bytes they reserve), in one query."""
    counts = (
        Instance.objects.live()
        .filter(backend__in=aliases)
        .values("backend", "host")
        .annotate(instances=Count("pk"), reserved=Sum("memory_reservation", default=0, filter=RESERVING_MEMORY))
    )
    return {(row["backend"], row["host"]): (row["instances"], row["reserved"]) for row in counts}


def _row(alias: str, node: "Node", held: dict[tuple[str, str], tuple[int, int]]) -> NodeRow:
    instances, reserved = held.get((alias, node.public_host), (0, 0))
    return NodeRow(
        backend=alias,
        id=node.id,
        hostname=node.hostname,
        address=node.address,
        public_host=node.public_host,
        state=node.state,
        availability=node.availability,
        role=node.role,
        labelled=node.labelled,
        memory=node.memory,
        reserved=reserved,
        instances=instances,
    )


def locate(node_id: str) -> str:
    """The alias of the placing backend that has node `node_id`. UnknownNode if none has it;
    FleetUnavailable if none has it but one could not be asked (it may be that one's)."""
    failed = []
    for backend in placing_backends():
        try:
            listed = backend.nodes(fresh=True)
        except BackendError as exc:
            failed.append(f"{backend.alias}: {exc}")
            continue
        if any(node.id == node_id for node in listed):
            return backend.alias
    if failed:
        raise FleetUnavailable(
            f"Node {node_id} was not found, and not every backend could be asked. {' '.join(failed)}"
        )
    raise UnknownNode(f"No node {node_id} in any backend that places servers.")


def act(alias: str, node_id: str, action: str, *, by: object) -> tuple[NodeRow, str]:
    """Carry out one of ACTIONS on a node: the node as it is then, and a sentence saying what was
    done. UnknownNode, FleetUnavailable."""
    row = set_availability(alias, node_id, ACTIONS[action], by=by)
    name = f"Node {row.hostname or row.id} ({alias})"
    if action != "drain":
        taking = "takes new instances" if row.availability == "active" else "takes no new instances"
        return row, f"{name} is {row.availability}: it {taking}."
    requested, stay = moves.move_all(alias=alias, host=row.public_host, by=by)
    said = f"{name} takes no new instances; moving its {requested} running instances to other nodes."
    if stay:
        said += f" {stay} others (stopped or busy) stay on it: drain it again once they run."
    return row, said


def set_availability(alias: str, node_id: str, availability: str, *, by: object) -> NodeRow:
    """Make node `node_id` of backend `alias` take new instances ("active") or not ("pause": the
    instances on it keep running); the node as it is then. UnknownNode, FleetUnavailable."""
    if availability not in ("active", "pause"):
        raise ValueError(f"A node's availability here is active or pause, not {availability!r}.")
    if alias not in {backend.alias for backend in placing_backends()}:
        raise UnknownNode(f"{alias!r} is not a backend that places servers.")
    backend = get_backend(alias)
    try:
        if not any(node.id == node_id for node in backend.nodes(fresh=True)):
            raise UnknownNode(f"Backend {alias} has no node {node_id}.")
        backend.set_availability(node_id, availability)
        node = next((node for node in backend.nodes(fresh=True) if node.id == node_id), None)
    except BackendError as exc:
        raise FleetUnavailable(str(exc)) from exc
    if node is None:  # it left between the change and the listing
        raise UnknownNode(f"Backend {alias} has no node {node_id}.")
    logger.info("Node %s (%s) of backend %s set to %s by %s", node_id, node.hostname, alias, availability, by)
    return _row(alias, node, _held([alias]))
