"""Every change to an instance goes through here: the API, pages and admin call these."""

import logging
import re
import secrets
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from . import crypto
from .backends.base import BackendError, get_backend
from .engines import OptionErrors, get_engine
from .engines import mysql as mysql_engine
from .engines import redis as redis_engine
from .models import BUSY_STATUSES, Instance, Kind, Status

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,39}")
NAME_RULE = "1 to 40 characters: lower-case letters, digits and hyphens, starting with a letter."


class QuotaExceeded(Exception):
    pass


class WrongStatus(Exception):
    """The instance is not in a status that allows the action."""

    def __init__(self, instance: Instance, action: str):
        super().__init__(f"Cannot {action} an instance that is {instance.status}.")
        self.instance = instance


class NoFreePort(Exception):
    pass


class Busy(Exception):
    """Another worker holds the instance; the task is tried again a little later."""


# Create -------------------------------------------------------------------------------


def create_instance(*, owner, kind: str, options: dict[str, Any], name: str | None = None) -> Instance:
    """Validate, reserve a port and record the instance; a worker starts it after commit.

    Raises ValidationError (bad name or options), QuotaExceeded or NoFreePort.
    """
    engine = get_engine(kind)
    try:
        cleaned = engine.clean_options(options)
    except OptionErrors as exc:
        raise ValidationError(exc.errors) from None
    if name is not None and not NAME_PATTERN.fullmatch(name):
        raise ValidationError({"name": f"{name!r} is not a valid name; use {NAME_RULE}"})
    backend = get_backend()

    with transaction.atomic():
        # One create at a time per user, so the quota and name checks cannot race.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        live = Instance.objects.filter(owner=owner).live().count()
        if live >= settings.STOCKROOM_QUOTA:
            raise QuotaExceeded(
                f"Quota reached: you have {live} live instances and the limit is {settings.STOCKROOM_QUOTA}. "
                "Delete one first."
            )
        name = name or f"{kind}-{secrets.token_hex(3)}"
        if Instance.objects.visible().filter(owner=owner, kind=kind, name=name).exists():
            raise ValidationError({"name": f"You already have a {kind} instance named {name!r}."})
        instance = Instance(
            owner=owner,
            kind=kind,
            name=name,
            backend=backend.alias,
            host=backend.public_host,
            options=cleaned,
            status_message="Waiting for a worker to start the server.",
            password=crypto.generate_password(),
            admin_password=crypto.generate_password(),
            **_accounts(kind),
        )
        _save_with_free_port(instance, backend)
        instance.record_event("", Status.PROVISIONING, f"Requested by {owner}.")
        transaction.on_commit(lambda: _enqueue("provision_instance", instance, revert_to=Status.FAILED))
    logger.info("Instance %s (%s) requested by %s on port %s", instance.pk, kind, owner, instance.port)
    return instance


def _accounts(kind: str) -> dict[str, str]:
    if kind == Kind.MYSQL:
        return {"database": mysql_engine.DATABASE, "username": mysql_engine.USERNAME}
    return {"database": "", "username": redis_engine.USERNAME}


def _save_with_free_port(instance: Instance, backend) -> None:
    """Take the lowest port in range that no live instance holds and nothing listens on.

    The database's unique constraint is the arbiter: if a concurrent create took the same
    port first, the insert fails and the next port is tried.
    """
    first, last = settings.STOCKROOM_PORT_RANGE
    held = set(Instance.objects.live().filter(host=instance.host).values_list("port", flat=True))
    for port in range(first, last + 1):
        if port in held or not backend.port_is_free(port):
            continue
        instance.port = port
        try:
            with transaction.atomic():
                instance.save()
            return
        except IntegrityError:
            if not Instance.objects.live().filter(host=instance.host, port=port).exists():
                raise  # not a port clash: let the caller see it
            held.add(port)
    raise NoFreePort(f"No free port is left in {first}-{last}; ask an operator to widen STOCKROOM_PORT_RANGE.")


def provision(instance_id: int) -> None:
    """Worker side of create: start the server, prove a login works, then mark it running."""
    _work_on(instance_id, (Status.PROVISIONING,), _provision)


def _provision(instance: Instance, backend) -> None:
    instance.timings = {"queued": round((timezone.now() - instance.created_at).total_seconds(), 4)}
    instance.mark(None)
    try:
        backend.create(instance)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        _fail(instance, backend, "Provisioning failed", exc)
        return
    Instance.objects.filter(pk=instance.pk).update(timings=instance.timings)
    if instance.transition(
        Status.RUNNING, "Started; a login with the user's credentials succeeded.", allowed_from=(Status.PROVISIONING,)
    ):
        logger.info("Instance %s is running on port %s", instance.pk, instance.port)
    else:  # someone else moved it on meanwhile; what they decided stands
        logger.warning("Instance %s left provisioning while it was being started", instance.pk)


def _describe(what: str, instance: Instance, exc: Exception) -> str:
    """A message for the owner: a backend's own words, or a pointer to the worker log."""
    if isinstance(exc, BackendError):
        return f"{what}: {exc}"
    logger.exception("%s for instance %s", what, instance.pk)
    return f"{what}: unexpected {type(exc).__name__}; an operator can find details in the worker log."


def _fail(instance: Instance, backend, what: str, exc: Exception) -> None:
    message = _describe(what, instance, exc)
    try:
        backend.destroy(instance)
    except Exception as cleanup:  # noqa: BLE001
        logger.exception("Cleanup failed for instance %s", instance.pk)
        message += f" Cleaning up also failed ({cleanup}); an operator must remove what is left."
    instance.transition(Status.FAILED, message, allowed_from=(Status.PROVISIONING, Status.DELETING))
    logger.warning("Instance %s failed: %s", instance.pk, message)


# Delete -------------------------------------------------------------------------------


DELETABLE = (Status.RUNNING, Status.UNHEALTHY, Status.STOPPED, Status.FAILED)


def delete_instance(*, instance: Instance, by) -> Instance:
    """Mark the instance as deleting; a worker stops it and removes its data after commit.

    Raises WrongStatus while a worker is busy with the instance or it is already deleted.
    """
    previous = instance.status
    if not instance.transition(
        Status.DELETING,
        f"Deletion requested by {by}.",
        allowed_from=DELETABLE,
    ):
        instance.refresh_from_db()
        raise WrongStatus(instance, "delete")
    transaction.on_commit(lambda: _enqueue("deprovision_instance", instance, revert_to=previous))
    return instance


def deprovision(instance_id: int) -> None:
    """Worker side of delete: stop the server, remove its files, release its port."""
    _work_on(instance_id, (Status.DELETING,), _deprovision)


def _deprovision(instance: Instance, backend) -> None:
    try:
        backend.destroy(instance)
    except Exception as exc:  # noqa: BLE001
        message = _describe("Delete failed", instance, exc) + " Try deleting again."
        instance.transition(Status.FAILED, message, allowed_from=(Status.DELETING,))
        return
    instance.transition(
        Status.DELETED, f"Stopped and removed; port {instance.port} released.", allowed_from=(Status.DELETING,)
    )
    logger.info("Instance %s deleted", instance.pk)


# Lifecycle actions --------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """A user action on a running (or stopped) instance, carried out by the worker."""

    title: str
    allowed_from: tuple[Status, ...]
    busy: Status
    done: Status
    done_message: str
    button: str = ""  # the label on pages, if not the title

    @property
    def label(self) -> str:
        return self.button or self.title


ACTIONS = {
    "stop": Action("Stop", (Status.RUNNING, Status.UNHEALTHY), Status.STOPPING, Status.STOPPED, "Stopped; data kept."),
    "start": Action("Start", (Status.STOPPED,), Status.STARTING, Status.RUNNING, "Started; a login succeeded."),
    "restart": Action(
        "Restart",
        (Status.RUNNING, Status.UNHEALTHY),
        Status.RESTARTING,
        Status.RUNNING,
        "Restarted; a login succeeded.",
    ),
    "rotate-password": Action(
        "Password rotation",
        (Status.RUNNING,),
        Status.ROTATING,
        Status.RUNNING,
        "Password rotated; the old one no longer works.",
        button="Rotate password",
    ),
}


ACTION_OF = {spec.busy: name for name, spec in ACTIONS.items()}  # what a busy status is busy with


def request_action(*, instance: Instance, action: str, by) -> Instance:
    """Mark the instance busy with `action`; a worker carries it out after commit.

    Raises WrongStatus when the instance's status does not allow the action.
    """
    spec = ACTIONS[action]
    previous = instance.status
    if not instance.transition(spec.busy, f"{spec.title} requested by {by}.", allowed_from=spec.allowed_from):
        instance.refresh_from_db()
        raise WrongStatus(instance, action.replace("-", " "))
    transaction.on_commit(lambda: _enqueue("perform_action", instance, action, revert_to=previous))
    return instance


def perform_action(instance_id: int, action: str) -> None:
    """Worker side of a lifecycle action."""
    _work_on(instance_id, (ACTIONS[action].busy,), _perform, action)


def _perform(instance: Instance, backend, action: str) -> None:
    spec = ACTIONS[action]
    try:
        if action == "stop":
            backend.stop(instance)
        elif action == "start":
            backend.start(instance)
        elif action == "restart":
            backend.restart(instance)
        else:
            _rotate_password(instance, backend)
    except Exception as exc:  # noqa: BLE001
        message = _describe(f"{spec.title} failed", instance, exc)
        if action == "start":  # a stopped instance stays stopped, with nothing half-started left running
            message += _stop_quietly(instance, backend)
            instance.transition(Status.STOPPED, message, allowed_from=(spec.busy,))
        else:  # anything that should run is left to the reconciler
            instance.transition(Status.UNHEALTHY, message, allowed_from=(spec.busy,))
    else:
        Instance.objects.filter(pk=instance.pk).update(restart_attempts=0)  # the owner acted: count afresh
        instance.transition(spec.done, spec.done_message, allowed_from=(spec.busy,))


def _rotate_password(instance: Instance, backend) -> None:
    """Set a new password; if that fails part-way, put the old one back so the user is not locked out."""
    old, new = instance.password, crypto.generate_password()
    try:
        backend.set_password(instance, new)
        Instance.objects.filter(pk=instance.pk).update(password=new)
    except Exception:
        try:
            backend.set_password(instance, old)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            logger.exception("Could not restore the old password of instance %s", instance.pk)
        raise
    instance.password = new
    backend.probe(instance)


def _stop_quietly(instance: Instance, backend) -> str:
    """Stop what may be running; returns "" or a sentence saying that it could not."""
    try:
        backend.stop(instance)
    except Exception as exc:  # noqa: BLE001 - the caller's status message says what matters
        logger.exception("Could not stop instance %s", instance.pk)
        return f" Stopping what was left also failed ({exc}); an operator should check the host."
    return ""


def _work_on(instance_id: int, statuses: tuple[Status, ...], work: Callable, *args) -> None:
    """The worker side of every service: if the instance is still in one of `statuses` (a task
    may be delivered twice), claim it, call work(instance, backend, *args) and release it.

    Raises Busy if another worker holds it; see Instance.claim.
    """
    instance = Instance.objects.filter(pk=instance_id, status__in=statuses).first()
    if instance is None:
        return
    backend = get_backend(instance.backend)
    if not instance.claim(seconds=settings.STOCKROOM_CLAIM_SECONDS):
        raise Busy(f"Instance {instance.pk} is held by another worker.")
    try:
        work(instance, backend, *args)
    finally:
        instance.release()


# Healing (the reconciler decides, these act) ------------------------------------------


def enqueue_heal(instance: Instance) -> None:
    from . import tasks

    tasks.heal_instance.delay(instance.pk)


def enqueue_recover(instance: Instance) -> None:
    from . import tasks

    tasks.recover_instance.delay(instance.pk)


def restart_delay(attempt: int) -> float:
    """Seconds to wait before restart number `attempt + 1`: exponential, capped."""
    return min(settings.STOCKROOM_RESTART_BACKOFF * 2**attempt, settings.STOCKROOM_RESTART_BACKOFF_MAX)


def heal(instance_id: int) -> None:
    """Restart an unhealthy instance, with backoff; give up after STOCKROOM_MAX_RESTARTS."""
    with suppress(Busy):  # the reconciler asks again next pass
        _work_on(instance_id, (Status.UNHEALTHY,), _heal)


def _heal(instance: Instance, backend) -> None:
    if instance.next_restart_at and instance.next_restart_at > timezone.now():
        return
    attempt = instance.restart_attempts
    if attempt >= settings.STOCKROOM_MAX_RESTARTS:
        _give_up(instance, backend)
        return
    Instance.objects.filter(pk=instance.pk).update(restart_attempts=attempt + 1)
    try:
        backend.restart(instance)
    except Exception as exc:  # noqa: BLE001
        message = _describe(f"Restart {attempt + 1} of {settings.STOCKROOM_MAX_RESTARTS} failed", instance, exc)
        # The wait counts from now: a start that timed out must not eat the backoff.
        Instance.objects.filter(pk=instance.pk, status=Status.UNHEALTHY).update(
            status_message=message, next_restart_at=timezone.now() + timedelta(seconds=restart_delay(attempt))
        )
        return
    # Restarts keep counting (see the reconciler) until the server has stayed up for a while.
    instance.transition(
        Status.RUNNING,
        f"Restarted after it stopped answering (attempt {attempt + 1}).",
        allowed_from=(Status.UNHEALTHY,),
    )


def _give_up(instance: Instance, backend) -> None:
    """Stop trying: no process and no port are held any more; the data stays until deleted."""
    reason = instance.status_message
    trouble = _stop_quietly(instance, backend)
    instance.transition(
        Status.FAILED,
        f"Gave up after {instance.restart_attempts} restarts: it did not come back, or did not stay up for "
        f"{settings.STOCKROOM_STABLE_SECONDS:g} s (last: {reason}). "
        f"The data is kept until you delete the instance.{trouble}",
        allowed_from=(Status.UNHEALTHY,),
    )


def recover(instance_id: int) -> None:
    """Finish work that a worker left behind (it died, or the broker lost the job).

    A server that answers is running. Otherwise the work is done again, once: a create from a
    clean slate, a delete, or the user's action. If that is cut short too, it is given up.
    """
    with suppress(Busy):  # a live worker has it after all
        _work_on(instance_id, BUSY_STATUSES, _recover)


def _recover(instance: Instance, backend) -> None:
    busy, note = instance.status, "The worker handling it stopped"
    if instance.recoveries:
        _give_up_recovering(instance, backend, f"{note} twice")
        return
    Instance.objects.filter(pk=instance.pk).update(recoveries=1)
    if busy == Status.DELETING:
        _deprovision(instance, backend)
    elif (
        busy in (Status.PROVISIONING, Status.STARTING, Status.RESTARTING)
        and backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is None
    ):
        instance.transition(Status.RUNNING, f"{note}; the server answers, so it is running.", allowed_from=(busy,))
    elif busy == Status.PROVISIONING:  # a create starts from a clean slate, so just do it again
        Instance.objects.filter(pk=instance.pk).update(
            status_message=f"{note} before the server was ready; starting it again."
        )
        _provision(instance, backend)
    else:
        _perform(instance, backend, ACTION_OF[busy])


def _give_up_recovering(instance: Instance, backend, what: str) -> None:
    """A create or delete ends failed (with its leftovers removed); an action hands the
    instance to the reconciler as unhealthy."""
    busy = instance.status
    if busy in (Status.PROVISIONING, Status.DELETING):
        verb = "create" if busy == Status.PROVISIONING else "delete"
        _fail(instance, backend, what, BackendError(f"the {verb} was given up; try again."))
    else:
        instance.transition(
            Status.UNHEALTHY, f"{what}; the {ACTION_OF[busy].replace('-', ' ')} was given up.", allowed_from=(busy,)
        )


# Queueing -----------------------------------------------------------------------------


def _enqueue(task_name: str, instance: Instance, *args, revert_to: Status) -> None:
    """Send a task to the worker; if the broker is unreachable, say so in the status."""
    from . import tasks

    task: Callable = getattr(tasks, task_name)
    try:
        task.delay(instance.pk, *args)
    except Busy:  # only when tasks run inline (tests): the reconciler's recovery takes over
        logger.warning("Instance %s was held by another worker; %s left to recovery", instance.pk, task_name)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.error("Could not queue %s for instance %s: %s", task_name, instance.pk, exc)
        instance.transition(
            revert_to,
            f"The job could not be queued: the task broker is unreachable ({type(exc).__name__}). Try again.",
            allowed_from=(instance.status,),
        )
