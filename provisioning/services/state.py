"""The state machine: which side may move an instance from which status to which, and the one
function that does it.

Three sides change an instance's status:
- REQUEST: the API, pages and admin, through services/requests.py; also puts a status back
  when the job could not be queued;
- WORKER: the worker doing the job, through services/work.py;
- HEALER: the healing policy, through services/healing.py, on the reconciler's say-so.
"""

import enum
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from ..models import BUSY_STATUSES, Instance, InstanceEvent, Status, Webhook, WebhookDelivery
from . import jobs

STATUS_CHANGED = "instance.status_changed"  # the webhook type of a status change


class Side(enum.Enum):
    REQUEST = "request"
    WORKER = "worker"
    HEALER = "healer"


S = Status
# Side -> {from: the statuses it may move to}.
TRANSITIONS: dict[Side, dict[Status, frozenset[Status]]] = {
    Side.REQUEST: {
        S.RUNNING: frozenset({S.DELETING, S.STOPPING, S.RESTARTING, S.ROTATING, S.RESTORING, S.IMPORTING, S.MOVING}),
        S.UNHEALTHY: frozenset({S.DELETING, S.STOPPING, S.RESTARTING, S.RESTORING}),
        S.STOPPED: frozenset({S.DELETING, S.STARTING}),
        S.FAILED: frozenset({S.DELETING}),
        S.UNREACHABLE: frozenset({S.DELETING, S.MOVING}),
        # The job could not be queued: back to where the instance was (a create fails).
        S.PROVISIONING: frozenset({S.FAILED}),
        S.DELETING: frozenset({S.RUNNING, S.UNHEALTHY, S.STOPPED, S.FAILED, S.UNREACHABLE}),
        S.STOPPING: frozenset({S.RUNNING, S.UNHEALTHY}),
        S.RESTARTING: frozenset({S.RUNNING, S.UNHEALTHY}),
        S.STARTING: frozenset({S.STOPPED}),
        S.ROTATING: frozenset({S.RUNNING}),
        S.RESTORING: frozenset({S.RUNNING, S.UNHEALTHY}),
        S.IMPORTING: frozenset({S.RUNNING}),
        S.MOVING: frozenset({S.RUNNING, S.UNREACHABLE}),
    },
    Side.WORKER: {
        S.PROVISIONING: frozenset({S.RUNNING, S.FAILED}),
        S.DELETING: frozenset({S.DELETED, S.FAILED}),
        S.STOPPING: frozenset({S.STOPPED, S.UNHEALTHY}),
        S.STARTING: frozenset({S.RUNNING, S.STOPPED, S.UNHEALTHY}),
        S.RESTARTING: frozenset({S.RUNNING, S.UNHEALTHY}),
        S.ROTATING: frozenset({S.RUNNING, S.UNHEALTHY}),
        # A restore that failed leaves a server the reconciler restarts (its data as it was, or the
        # snapshot's, never a mix: the new data replaces the old in one rename).
        S.RESTORING: frozenset({S.RUNNING, S.UNHEALTHY}),
        # An import ends running, with the file's data or the data as it was (refused, or the
        # before-import snapshot put back); unhealthy only if putting the data back failed too.
        S.IMPORTING: frozenset({S.RUNNING, S.UNHEALTHY}),
        # A move ends running on its new host, or on its old one if it failed; an evacuation that
        # failed leaves it unreachable. Unhealthy: a worker that died during it (recovery).
        S.MOVING: frozenset({S.RUNNING, S.UNREACHABLE, S.UNHEALTHY}),
    },
    Side.HEALER: {
        S.RUNNING: frozenset({S.UNHEALTHY, S.UNREACHABLE}),
        S.UNHEALTHY: frozenset({S.RUNNING, S.FAILED, S.UNREACHABLE}),
        # Its host is back: it answers, or it is restarted as any server that stopped answering.
        S.UNREACHABLE: frozenset({S.RUNNING, S.UNHEALTHY}),
    },
}


class IllegalTransition(Exception):
    """Code asked for a change the table does not allow: a bug, never a user's mistake."""


def check_transition(side: Side, allowed_from: tuple[Status, ...], to: Status) -> None:
    illegal = [str(status) for status in allowed_from if to not in TRANSITIONS[side].get(status, ())]
    if illegal:
        raise IllegalTransition(f"The {side.value} side may not move an instance from {illegal} to {to}.")


def transition(
    instance: Instance,
    to: Status,
    reason: str,
    *,
    side: Side,
    allowed_from: tuple[Status, ...],
    unchanged_since: datetime | None = None,
    also: dict[str, Any] | None = None,
) -> bool:
    """Move `instance` to `to` only if its status is one of `allowed_from` (and, given
    `unchanged_since`, only if the row has not changed since that `updated_at`).

    The check and the change are one conditional UPDATE, so two workers can never both win; the
    winner records an event in the same transaction. `also` are further fields written with the
    change. Returns whether this call made the change; updates `instance` if so.
    A failed instance holds no port; only an unhealthy one waits for a restart.
    """
    check_transition(side, allowed_from, to)
    changes: dict[str, Any] = {"status": to, "status_message": reason, "updated_at": timezone.now()}
    if to not in BUSY_STATUSES:
        changes["recoveries"] = 0
    if to != Status.UNHEALTHY:
        changes["next_restart_at"] = None
    if to == Status.FAILED:
        changes["port"] = None
    changes.update(also or {})
    unchanged = Q() if unchanged_since is None else Q(updated_at=unchanged_since)
    with transaction.atomic():
        if len(allowed_from) == 1 and unchanged_since is None:  # the UPDATE alone decides: one query less
            current: str | None = allowed_from[0]
        else:  # which of them it is, for its history
            current = (
                Instance.objects.select_for_update()
                .filter(unchanged, pk=instance.pk, status__in=allowed_from)
                .values_list("status", flat=True)
                .first()
            )
        changed = current is not None and bool(
            Instance.objects.filter(pk=instance.pk, status=current).update(**changes)
        )
        if changed:
            record_event(instance, current or "", to, reason)
    if changed:
        for name, value in changes.items():
            setattr(instance, name, value)
    return changed


def record_event(
    instance: Instance, from_status: str, to_status: str, reason: str, *, type: str = STATUS_CHANGED
) -> InstanceEvent:
    """Write the history entry for a status change (or, with `type`, an outcome that changes none),
    and its webhook deliveries in the same transaction (an outbox): a worker sends them once it
    commits, or the reconciler later."""
    event = InstanceEvent.objects.create(
        instance=instance, from_status=from_status, to_status=to_status, reason=reason, type=type
    )
    webhooks = Webhook.objects.filter(owner_id=instance.owner_id)
    deliveries = WebhookDelivery.objects.bulk_create(WebhookDelivery(webhook=hook, event=event) for hook in webhooks)
    if deliveries:
        ids = [delivery.pk for delivery in deliveries]
        transaction.on_commit(lambda: jobs.send_deliveries(ids))
    return event
