"""Instances that change hosts, on a backend that places servers on many (`BaseBackend.places`).

- A *move* takes a running instance to the host with the most room, with its data: its writes are
  refused, a snapshot streams from its node to the portal's storage and is restored on the new
  node, and the new server starts there. Reads go on until the old server stops. The pause of its
  writes is measured, said in its status and history, and sent as an `instance.moved` webhook with
  the old and new host and port. A move that fails leaves it running where it was, with its data.
- A *drain* moves every running instance off a node, which first stops taking new ones
  (services/fleet.py).
- An *evacuation* rebuilds an unreachable instance (its host is out of reach) on another host from
  its last ready snapshot: whatever was written after that snapshot is lost, and its status says
  from when.
"""

import logging
import tempfile
import time
from datetime import datetime

from django.conf import settings
from django.db import IntegrityError, transaction

from ..backends.base import BackendError, BaseBackend, get_backend
from ..models import Instance, Snapshot, SnapshotStatus, Status
from . import capacity, certificates, ports, snapshots
from .capacity import NoCapacity
from .claims import work_on
from .outcomes import describe
from .requests import WrongStatus, enqueue
from .state import Side, record_event, transition

logger = logging.getLogger(__name__)

# Bytes reserved on a host that no host has: what _relocate says of an instance's own host, so
# that placing it picks among the others.
FULL = 2**62

MOVED = "instance.moved"  # the event (and webhook) type of a move or an evacuation that succeeded


class CannotMove(Exception):
    """The instance cannot be moved or evacuated as asked (409); the message says why."""


def request_move(*, instance: Instance, by: object) -> Instance:
    """Mark a running instance moving; a worker moves it after commit. Raises CannotMove on a
    backend of one host, WrongStatus unless it is running."""
    if not get_backend(instance.backend).places:
        raise CannotMove(f"The {instance.backend} backend runs every server on one host: there is nowhere to move to.")
    return _to_moving(instance, "move_instance", "A move", from_status=Status.RUNNING, verb="move", by=by)


def request_evacuation(*, instance: Instance, by: object) -> Instance:
    """Mark an unreachable instance moving; a worker rebuilds it on another host from its last
    ready snapshot. Raises CannotMove without such a snapshot, WrongStatus unless unreachable."""
    if instance.status != Status.UNREACHABLE:
        raise WrongStatus(instance, "evacuate")
    evacuation_source(instance)
    return _to_moving(
        instance, "evacuate_instance", "An evacuation", from_status=Status.UNREACHABLE, verb="evacuate", by=by
    )


def _to_moving(instance: Instance, task: str, what: str, *, from_status: Status, verb: str, by: object) -> Instance:
    """The request side of a move and an evacuation alike: `moving` (from `from_status` only, with an
    event saying who asked `what`), and `task` queued once that commits; a worker that cannot do it
    puts `from_status` back. WrongStatus (for `verb`) if the instance is no longer in `from_status`."""
    with transaction.atomic():
        moved = transition(
            instance,
            Status.MOVING,
            f"{what} to another node was requested by {by}.",
            side=Side.REQUEST,
            allowed_from=(from_status,),
        )
        if moved:
            transaction.on_commit(lambda: enqueue(task, instance, revert_to=from_status))
    if not moved:
        instance.refresh_from_db()
        raise WrongStatus(instance, verb)
    return instance


def move_all(*, alias: str, host: str, by: object) -> tuple[int, int]:
    """Request a move of each running instance of backend `alias` on `host` (a drain, once its node
    takes no new ones: services/fleet.py): how many were requested, and how many live ones stay
    (stopped, busy or unhealthy: a later drain moves them once they run)."""
    requested = stay = 0
    for instance in Instance.objects.live().filter(backend=alias, host=host).order_by("pk"):
        try:
            request_move(instance=instance, by=by)
            requested += 1
        except WrongStatus:
            stay += 1
    return requested, stay


def evacuation_source(instance: Instance) -> Snapshot:
    """The snapshot an evacuation would rebuild `instance` from (its last ready one), for the
    request and for the pages that offer it; CannotMove, saying why, if it has none."""
    snapshot = last_snapshot(instance)
    if snapshot is None:
        raise CannotMove("It has no ready snapshot to be rebuilt from; it can only wait for its host to come back.")
    return snapshot


def last_snapshot(instance: Instance) -> Snapshot | None:
    return (
        Snapshot.objects.filter(instance=instance, status=SnapshotStatus.READY).order_by("-created_at", "-pk").first()
    )


# The worker side ---------------------------------------------------------------------


def move(instance_id: int) -> None:
    work_on(instance_id, (Status.MOVING,), _move)


def _move(instance: Instance, backend: BaseBackend) -> None:
    assert instance.port is not None, "a running instance holds a port"
    source = (instance.host, instance.port)
    try:
        _relocate(instance, backend, record=True)
    except (NoCapacity, BackendError) as exc:
        transition(instance, Status.RUNNING, f"Not moved: {exc}", side=Side.WORKER, allowed_from=(Status.MOVING,))
        return
    started = time.monotonic()
    try:
        with tempfile.TemporaryFile(dir=settings.STOCKROOM_SNAPSHOT_DIR, prefix="moving-") as spool:
            paused = backend.move(instance, source, spool)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        if _put_back(instance, source):
            message = describe("The move failed; it runs on its old node again, with its data", instance, exc)
            transition(instance, Status.RUNNING, message, side=Side.WORKER, allowed_from=(Status.MOVING,))
        return
    said = (
        f"Moved from {source[0]}:{source[1]} to {instance.host}:{instance.port}, with its data, in "
        f"{time.monotonic() - started:.1f} s; writes were refused for {paused:.1f} s, reads for less."
    )
    _done(instance, said, {"move_pause": round(paused, 3)})


def evacuate(instance_id: int) -> None:
    work_on(instance_id, (Status.MOVING,), _evacuate)


def _evacuate(instance: Instance, backend: BaseBackend) -> None:
    source = (instance.host, instance.port)
    snapshot = last_snapshot(instance)
    try:
        if snapshot is None:
            raise BackendError("Its last snapshot was deleted meanwhile.")
        _relocate(instance, backend)
    except (NoCapacity, BackendError) as exc:
        transition(
            instance, Status.UNREACHABLE, f"Not evacuated: {exc}", side=Side.WORKER, allowed_from=(Status.MOVING,)
        )
        return
    try:
        with snapshots.verified(snapshot) as file:
            backend.rebuild(instance, file)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        if _put_back(instance, source):
            message = describe("The evacuation failed; it waits for its host", instance, exc)
            transition(instance, Status.UNREACHABLE, message, side=Side.WORKER, allowed_from=(Status.MOVING,))
        return
    said = (
        f"Rebuilt on {instance.host}:{instance.port} from snapshot {snapshot.pk}, taken {_when(snapshot.created_at)}: "
        f"whatever was written after that is lost. Its old host {source[0]} was out of reach."
    )
    _done(instance, said, {})


def recover(instance: Instance, backend: BaseBackend, note: str) -> bool:
    """After the worker moving `instance` stopped (`note` says so), decided by how far the move got,
    never by whether a server answers at that moment:
    - its new server was made: it may have taken writes, so the move stands. It is done once that
      server answers (its old folder goes then); until then it is unhealthy where it went, and the
      reconciler starts it there;
    - it was not: the instance takes its old host and port back first, then the backend removes what
      the move made and starts the old server from its own folder (a move never removes that folder
      before its new server answered).
    False, and nothing done, if there is nothing to go by: the worker stopped before the move began,
    or it was an evacuation (whose old server is out of reach)."""
    if not instance.move_source:
        return False
    assert instance.port is not None, "a moving instance holds a port"
    source, target = (instance.move_source[0], int(instance.move_source[1])), (instance.host, instance.port)
    try:
        made = backend.move_made(instance)
        if made and backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is None:
            _forget_source(instance, backend, source, target)
            said = (
                f"{note}, but the move had finished: moved from {source[0]}:{source[1]} to {instance.host}:"
                f"{instance.port}, with its data."
            )
            _done(instance, said, {})
        elif made:
            message = (
                f"{note} during a move, after its new server on {instance.host}:{instance.port} was made, which may "
                "have taken writes since: it stays there, and is started again there."
            )
            _leave_moving(instance, Status.UNHEALTHY, message)
        elif _put_back(instance, source):  # its port first: no create takes it meanwhile
            backend.end_move(instance, source=source, target=target, moved=False)
            message = f"{note} during a move; it runs where it was again, with its data."
            _leave_moving(instance, Status.RUNNING, message)
    except BackendError as exc:
        message = describe(f"{note} during a move, which could not be ended", instance, exc)
        _leave_moving(instance, Status.UNHEALTHY, message)
    return True


def _forget_source(instance: Instance, backend: BaseBackend, source: tuple[str, int], target: tuple[str, int]) -> None:
    """The old folder of a move that stands goes; if it cannot now, it stays, and the log says so."""
    try:
        backend.end_move(instance, source=source, target=target, moved=True)
    except BackendError:
        logger.exception("Instance %s moved, but what it left on %s stays", instance.pk, source[0])


def _leave_moving(instance: Instance, status: Status, message: str) -> None:
    transition(instance, status, message, side=Side.WORKER, allowed_from=(Status.MOVING,), also={"move_source": None})


def _relocate(instance: Instance, backend: BaseBackend, *, record: bool = False) -> None:
    """Give the instance the host with the most room (not its own) and a free port there, in the
    database; its server moves afterwards. `record`: its old host and port as `move_source` too,
    in the same transaction (what `recover` puts back). Raises NoCapacity if no other host has room."""
    source = [instance.host, instance.port]
    with transaction.atomic():
        capacity.hold(instance.owner)
        # Its own host counted full, so that it goes to the roomiest of the others.
        reserved = {**capacity.reserved_by_host(backend.alias), instance.host: FULL}
        try:
            if not any(node.usable and node.public_host != instance.host for node in backend.nodes(fresh=True)):
                raise NoCapacity("No other node takes instances now (ready, active and labelled for them).")
            host = backend.place(instance.memory_reservation, reserved)
        except BackendError as exc:  # no other node has room (NoRoom), or the manager does not answer
            raise NoCapacity(str(exc)) from None
        ports.take_on(instance, backend, host)
        if record:
            Instance.objects.filter(pk=instance.pk).update(move_source=source)
            instance.move_source = source
    certificates.ensure(instance)  # one for its new host, if it serves TLS


def _put_back(instance: Instance, source: tuple[str, int | None]) -> bool:
    """The instance's old host and port again, after a move or evacuation failed; False (and the
    instance unhealthy, saying so) if another instance took that port meanwhile."""
    try:
        with transaction.atomic():
            Instance.objects.filter(pk=instance.pk).update(host=source[0], port=source[1], move_source=None)
    except IntegrityError:
        message = (
            f"The move failed, and port {source[1]} on {source[0]} was taken meanwhile; "
            "its server there cannot be reached. Restart it to move it to a free port."
        )
        transition(
            instance, Status.UNHEALTHY, message, side=Side.WORKER, allowed_from=(Status.MOVING,),
            also={"move_source": None},
        )  # fmt: skip
        return False
    instance.host, instance.port = source
    certificates.ensure(instance)
    return True


def _done(instance: Instance, said: str, timings: dict[str, float]) -> None:
    with transaction.atomic():
        moved = transition(
            instance,
            Status.RUNNING,
            said,
            side=Side.WORKER,
            allowed_from=(Status.MOVING,),
            also={"timings": {**(instance.timings or {}), **timings}, "move_source": None},
        )
        if moved:
            record_event(instance, Status.RUNNING, Status.RUNNING, said, type=MOVED)
    logger.info("Instance %s: %s", instance.pk, said)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC"
