"""The worker side: claim the instance, do the job through its backend, record the outcome.

Every job ends in a status a person can act on. A create is done again once, from a clean slate,
when its worker died (recover()) or its server died while starting; then it is given up.
"""

import logging
from contextlib import suppress
from datetime import datetime
from typing import Any

from django.conf import settings
from django.utils import timezone

from .. import crypto
from ..backends.base import BackendError, BaseBackend, ServerExited
from ..models import BUSY_STATUSES, Instance, Status
from . import certificates, changes, healing, imports, jobs, logs, moves, ports, snapshots, versions
from .actions import ACTION_OF, ACTIONS
from .claims import Busy, work_on
from .outcomes import describe, stop_quietly, with_note
from .state import Side, transition

logger = logging.getLogger(__name__)


# Create -------------------------------------------------------------------------------


def provision(instance_id: int) -> None:
    """Start the server, prove a login works, then mark it running."""
    work_on(instance_id, (Status.PROVISIONING,), _provision)


def _provision(instance: Instance, backend: BaseBackend) -> None:
    instance.timings = {"queued": round((timezone.now() - instance.created_at).total_seconds(), 4)}
    instance.mark(None)
    moved = ""  # a sentence, if something took the port after it was reserved
    try:
        moved = ports.move_if_taken(instance, backend, creating=True)
        certificates.ensure(instance)
        backend.create(instance)
        if instance.restore_from is not None:  # a clone: the snapshot's data, the new instance's accounts
            base, until = instance.restore_from, instance.restore_until
            replay = logs.replay_for(instance, backend, base, until) if until is not None else None
            with snapshots.verified(base) as file:
                backend.restore(instance, file, replay)
        elif instance.restore_from_id is not None:
            raise BackendError("The snapshot to clone was deleted before the clone was made.")
        if instance.import_file:  # a clone from a file
            imports.load_into_new(instance, backend)
    except ServerExited as exc:
        if not _redo_once(instance, f"The server died while starting ({exc})"):
            _fail(instance, backend, "Provisioning failed, on its second try", exc)
            return
        _provision(instance, backend)  # create() begins by destroying what the first try left
        return
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        _fail(instance, backend, "Provisioning failed", exc)
        return
    upload = instance.import_file
    # A clone's data is a snapshot's, of whatever version took it.
    data = versions.Data.NEW if instance.restore_from_id is None else versions.Data.REPLACED
    version, note = versions.after_start(instance, backend, data=data)
    if transition(
        instance,
        Status.RUNNING,
        with_note(with_note("Started; a login with the user's credentials succeeded.", moved), note),
        side=Side.WORKER,
        allowed_from=(Status.PROVISIONING,),
        also={
            "timings": instance.timings,
            "restore_from": None,
            "restore_until": None,
            "import_file": "",
            **version,
        },
    ):
        imports.forget_upload(upload)
        logger.info("Instance %s is running on port %s", instance.pk, instance.port)
    else:  # someone else moved it on meanwhile; what they decided stands
        logger.warning("Instance %s left provisioning while it was being started", instance.pk)


def _redo_once(instance: Instance, why: str) -> bool:
    """Use the create's one redo (the same one recover() uses after a dead worker), saying why;
    False if it was used already."""
    if instance.recoveries:
        return False
    message = f"{why}; starting it again from a clean slate."
    Instance.objects.filter(pk=instance.pk).update(recoveries=1, status_message=message)
    instance.recoveries = 1
    logger.warning("Instance %s: %s", instance.pk, message)
    return True


def _fail(instance: Instance, backend: BaseBackend, what: str, exc: Exception) -> None:
    """A create (or a delete given up) ends failed, its leftovers removed: then it holds no data
    and leaves the owner's quota; what could not be removed keeps counting until it is deleted."""
    message, upload = describe(what, instance, exc), instance.import_file
    try:
        backend.destroy(instance)
        removed = True
    except Exception as cleanup:  # the status says so; an operator cleans up
        logger.exception("Cleanup failed for instance %s", instance.pk)
        message += f" Cleaning up also failed ({cleanup}); an operator must remove what is left."
        removed = False
    transition(
        instance,
        Status.FAILED,
        message,
        side=Side.WORKER,
        allowed_from=(Status.PROVISIONING, Status.DELETING),
        # A failed clone holds its snapshot (or its file) no more.
        also={"holds_data": not removed, "restore_from": None, "import_file": ""},
    )
    imports.forget_upload(upload)
    logger.warning("Instance %s failed: %s", instance.pk, message)


# Delete -------------------------------------------------------------------------------


def deprovision(instance_id: int) -> None:
    """Stop the server, remove its files, release its port."""
    work_on(instance_id, (Status.DELETING,), _deprovision)


def _deprovision(instance: Instance, backend: BaseBackend) -> None:
    undo = snapshots.before_delete(instance, backend)  # the delete's undo, while the server still runs
    try:
        backend.destroy(instance)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        message = describe("Delete failed", instance, exc) + " Try deleting again."
        # Whatever the destroy left may be data: it keeps counting against the quota.
        kept = {"holds_data": True}
        transition(instance, Status.FAILED, message, side=Side.WORKER, allowed_from=(Status.DELETING,), also=kept)
        return
    transition(
        instance,
        Status.DELETED,
        with_note(f"Stopped and removed; port {instance.port} released.", undo),
        side=Side.WORKER,
        allowed_from=(Status.DELETING,),
        also={"holds_data": False},
    )
    logger.info("Instance %s deleted", instance.pk)


# Lifecycle actions --------------------------------------------------------------------


def perform_action(instance_id: int, action: str) -> None:
    work_on(instance_id, (ACTIONS[action].busy,), _perform, action)


def _perform(instance: Instance, backend: BaseBackend, action: str) -> None:
    spec = ACTIONS[action]
    moved = ""  # a sentence, if a stranger held the port and the instance moved
    try:
        if action == "stop":
            backend.stop(instance)
        elif action == "start":
            moved = ports.move_if_taken(instance, backend)
            changes.apply_pending(instance)
            certificates.ensure(instance)
            backend.start(instance)
        elif action == "restart":
            moved = ports.move_if_taken(instance, backend)
            changes.apply_pending(instance)  # what waited for a restart takes effect now
            certificates.ensure(instance)  # a tls just applied needs its certificate
            backend.restart(instance)
        else:
            _rotate_password(instance, backend)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        message = with_note(describe(f"{spec.title} failed", instance, exc), moved)
        if action == "start":  # a stopped instance stays stopped, with nothing half-started left running
            message += stop_quietly(instance, backend)
            transition(instance, Status.STOPPED, message, side=Side.WORKER, allowed_from=(spec.busy,))
        else:  # anything that should run is left to the reconciler
            transition(instance, Status.UNHEALTHY, message, side=Side.WORKER, allowed_from=(spec.busy,))
    else:
        healing.forget_restarts(instance)
        message, version = with_note(spec.done_message, moved), dict[str, Any]()
        if action in ("start", "restart"):  # a new server, maybe on new binaries
            version, note = versions.after_start(instance, backend, data=versions.Data.KEPT)
            message = with_note(message, note)
        transition(instance, spec.done, message, side=Side.WORKER, allowed_from=(spec.busy,), also=version)


def _rotate_password(instance: Instance, backend: BaseBackend) -> None:
    """Set a new password; if that fails part-way, put the old one back so the user is not locked out."""
    old, new = instance.password, crypto.generate_password()
    try:
        backend.set_password(instance, new)
        Instance.objects.filter(pk=instance.pk).update(password=new)
    except Exception:
        try:
            backend.set_password(instance, old)
        except Exception:  # the first error is the one to report
            logger.exception("Could not restore the old password of instance %s", instance.pk)
        raise
    instance.password = new
    backend.probe(instance)


# Work a dead worker left behind -------------------------------------------------------


def recover_later(instances: list[Instance], *, now: datetime) -> None:
    """Queue recovery of instances whose worker died. They are touched first, so that the next
    reconcile passes do not queue them again while these jobs wait."""
    Instance.objects.filter(pk__in=[instance.pk for instance in instances]).update(updated_at=now)
    for instance in instances:
        jobs.send("recover_instance", instance.pk)


def recover(instance_id: int) -> None:
    """Finish work that a worker left behind (it died, or the broker lost the job).

    A server that answers is running. Otherwise the work is done again, once: a create from a
    clean slate, a delete, or the user's action. If that is cut short too, it is given up.
    """
    with suppress(Busy):  # a live worker has it after all
        work_on(instance_id, BUSY_STATUSES, _recover)


def _recover(instance: Instance, backend: BaseBackend) -> None:
    busy, note = Status(instance.status), "The worker handling it stopped"
    if instance.recoveries:
        _give_up_recovering(instance, backend, f"{note} twice")
        return
    answers = (
        busy in (Status.PROVISIONING, Status.STARTING, Status.RESTARTING)
        and backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is None
    )
    if busy == Status.PROVISIONING and not answers:  # a create starts from a clean slate: do it again
        _redo_once(instance, f"{note} before the server was ready")
        _provision(instance, backend)
        return
    Instance.objects.filter(pk=instance.pk).update(recoveries=1)
    if busy == Status.DELETING:
        _deprovision(instance, backend)
    elif busy == Status.RESTORING:  # done again from the start: the old data stays until the new replaces it
        snapshots.restore_now(instance, backend)
    elif busy == Status.IMPORTING:  # undone: the before-import snapshot put back, if it was taken
        imports.recover(instance, backend)
    elif busy == Status.MOVING:  # finished, or put back where it was; else the reconciler finds out
        if not moves.recover(instance, backend, note):
            _give_up_recovering(instance, backend, f"{note} during a move")
    elif answers:
        version, upgraded = versions.after_start(instance, backend, data=versions.Data.KEPT)
        message = with_note(f"{note}; the server answers, so it is running.", upgraded)
        transition(instance, Status.RUNNING, message, side=Side.WORKER, allowed_from=(busy,), also=version)
    else:
        _perform(instance, backend, ACTION_OF[busy])


def _give_up_recovering(instance: Instance, backend: BaseBackend, what: str) -> None:
    """A create or delete ends failed (with its leftovers removed); an action hands the
    instance to the reconciler as unhealthy."""
    busy = Status(instance.status)
    if busy in (Status.PROVISIONING, Status.DELETING):
        verb = "create" if busy == Status.PROVISIONING else "delete"
        _fail(instance, backend, what, BackendError(f"the {verb} was given up; try again."))
    else:
        doing = {Status.RESTORING: "restore", Status.IMPORTING: "import", Status.MOVING: "move"}.get(busy)
        doing = doing or ACTION_OF[busy].replace("-", " ")
        message, upload = f"{what}; the {doing} was given up.", instance.import_file
        done = {"restore_from": None, "import_file": "", "move_source": None}
        transition(instance, Status.UNHEALTHY, message, side=Side.WORKER, allowed_from=(busy,), also=done)
        imports.forget_upload(upload)
