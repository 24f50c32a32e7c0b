"""The healing policy: the only writer of restart counting and backoff.

The reconciler decides (this one stopped answering, that one answers again) and calls these;
a worker restarts an unhealthy server through heal(), with exponential backoff, and gives up
after STOCKROOM_MAX_RESTARTS.
"""

import logging
from contextlib import suppress
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from ..backends.base import DISK_FULL, BaseBackend, get_backend
from ..models import Instance, Status
from . import certificates, jobs, ports, versions
from .claims import Busy, work_on
from .outcomes import describe, stop_quietly, with_note
from .state import Side, transition

logger = logging.getLogger(__name__)


def restart_delay(attempt: int) -> float:
    """Seconds to wait before restart number `attempt + 1`: exponential, capped."""
    delay: float = min(settings.STOCKROOM_RESTART_BACKOFF * 2**attempt, settings.STOCKROOM_RESTART_BACKOFF_MAX)
    return delay


def stopped_answering(instance: Instance, error: str, *, now: datetime) -> bool:
    """A running server did not answer the reconciler's probe: mark it unhealthy and, unless it
    must wait for its backoff, queue its restart. Returns whether it was marked (not if it
    changed while it was probed: a new password, a restart).

    Restarts count on from the last failure unless it has stayed up for STOCKROOM_STABLE_SECONDS,
    so a server that keeps dying soon after each restart ends failed instead of looping forever.
    """
    up_since = instance.updated_at
    stable = now - up_since >= timedelta(seconds=settings.STOCKROOM_STABLE_SECONDS)
    attempts = 0 if stable else instance.restart_attempts
    wait = restart_delay(attempts) if attempts else 0  # one that died soon after a restart waits
    why = get_backend(instance.backend).why_down(instance)
    marked = transition(
        instance,
        Status.UNHEALTHY,
        f"Stopped answering ({error}{f'; {why}' if why else ''}); restarting it.",
        side=Side.HEALER,
        allowed_from=(Status.RUNNING, Status.UNREACHABLE),  # unreachable: its host is back, its server is not
        unchanged_since=up_since,
        also={"restart_attempts": attempts, "next_restart_at": now + timedelta(seconds=wait)},
    )
    if marked and not wait:  # otherwise a later pass finds it due
        request_heal(instance)
    return marked


def disk_report(instance: Instance, full: str | None) -> None:
    """The reconciler's word on a running instance's disk (the backend's message when it is full):
    its status message says so while it is full, and stops saying so once it has room."""
    if full and instance.status_message != full:
        Instance.objects.filter(pk=instance.pk, status=Status.RUNNING).update(status_message=full)
    elif not full and instance.status_message.startswith(DISK_FULL):
        Instance.objects.filter(pk=instance.pk, status=Status.RUNNING, status_message=instance.status_message).update(
            status_message="Running; its disk has room again."
        )


def answers_again(instance: Instance) -> bool:
    """An unhealthy (or unreachable) server answered the probe: it is running."""
    back = instance.status == Status.UNREACHABLE
    return transition(
        instance,
        Status.RUNNING,
        "Its host is back, and it answers again." if back else "Answers again.",
        side=Side.HEALER,
        allowed_from=(Status.UNREACHABLE,) if back else (Status.UNHEALTHY,),
    )


def out_of_reach(instance: Instance, error: str, why: str) -> bool:
    """A server that did not answer is on a host the backend cannot reach (`why`): no restart can
    help, so it is marked unreachable until the host is back."""
    return transition(
        instance,
        Status.UNREACHABLE,
        f"Out of reach ({error}): {why}. It comes back with its data when its host does.",
        side=Side.HEALER,
        allowed_from=(Status.RUNNING, Status.UNHEALTHY),
    )


def restart_due(instance: Instance, *, now: datetime) -> bool:
    """Whether an unhealthy instance's backoff is over and no worker holds it."""
    due = instance.next_restart_at is None or instance.next_restart_at <= now
    free = instance.claimed_until is None or instance.claimed_until < now
    return due and free


def request_heal(instance: Instance) -> None:
    jobs.send("heal_instance", instance.pk)


def forget_restarts(instance: Instance) -> None:
    """The owner acted on the instance (a start, a restart): count restarts afresh."""
    Instance.objects.filter(pk=instance.pk).update(restart_attempts=0)
    instance.restart_attempts = 0


def heal(instance_id: int) -> None:
    """Worker side: restart an unhealthy instance, with backoff; give up after STOCKROOM_MAX_RESTARTS."""
    with suppress(Busy):  # the reconciler asks again next pass
        work_on(instance_id, (Status.UNHEALTHY,), _heal)


def _heal(instance: Instance, backend: BaseBackend) -> None:
    if instance.next_restart_at and instance.next_restart_at > timezone.now():
        return
    attempt = instance.restart_attempts
    if attempt >= settings.STOCKROOM_MAX_RESTARTS:
        _give_up(instance, backend)
        return
    Instance.objects.filter(pk=instance.pk).update(restart_attempts=attempt + 1)
    moved = ""  # a sentence, if a stranger held the port and the instance moved
    try:
        moved = ports.move_if_taken(instance, backend)
        certificates.ensure(instance)
        backend.restart(instance)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        what = f"Restart {attempt + 1} of {settings.STOCKROOM_MAX_RESTARTS} failed"
        message = with_note(describe(what, instance, exc), moved)
        # The wait counts from now: a start that timed out must not eat the backoff.
        Instance.objects.filter(pk=instance.pk, status=Status.UNHEALTHY).update(
            status_message=message, next_restart_at=timezone.now() + timedelta(seconds=restart_delay(attempt))
        )
        return
    # Restarts keep counting (see stopped_answering) until the server has stayed up for a while.
    version, note = versions.after_start(instance, backend, data=versions.Data.KEPT)
    transition(
        instance,
        Status.RUNNING,
        with_note(with_note(f"Restarted after it stopped answering (attempt {attempt + 1}).", moved), note),
        side=Side.HEALER,
        allowed_from=(Status.UNHEALTHY,),
        also=version,
    )


def _give_up(instance: Instance, backend: BaseBackend) -> None:
    """Stop trying: no process and no port are held any more; the data stays until deleted, and
    counts against the owner's quota until then (holds_data stays True)."""
    reason = instance.status_message
    trouble = stop_quietly(instance, backend)
    transition(
        instance,
        Status.FAILED,
        f"Gave up after {instance.restart_attempts} restarts: it did not come back, or did not stay up for "
        f"{settings.STOCKROOM_STABLE_SECONDS:g} s (last: {reason}). "
        f"The data is kept until you delete the instance.{trouble}",
        side=Side.HEALER,
        allowed_from=(Status.UNHEALTHY,),
    )
