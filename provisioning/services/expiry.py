"""Throwaway instances and idle ones: the owner's lifetime settings written (update, extend,
set_protected), and what the reconciler does with them each pass.

- warn_expiring: `instance.expiring` once, STOCKROOM_EXPIRY_WARNING before an instance expires;
- remove_expired: an expired instance is deleted through the usual delete (its before-delete
  snapshot kept), unless it is protected or a worker is busy with it;
- note_clients: a running instance with `stop_when_idle` that has had no client connection for
  that long is stopped (data kept); a client connection resets the count.
"""

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from ..models import Instance, Status
from . import lifetime
from .actions import DELETABLE
from .requests import WrongStatus, delete_instance, request_action
from .state import record_event

logger = logging.getLogger(__name__)

EXPIRING = "instance.expiring"  # the event (and webhook) type of the warning
REMOVER = "the reconciler"
# Instances whose lifetime may change: all but those being deleted or gone. A failed one too: its
# data may be kept, and a protected one must be unprotected before it can be deleted.
CHANGEABLE = tuple(status for status in Status if status not in (Status.DELETING, Status.DELETED))


# The owner's side ------------------------------------------------------------------------


@transaction.atomic
def update(*, instance: Instance, data: dict[str, Any], by: object, now: datetime | None = None) -> Instance:
    """Set the lifetime fields `data` names (expires_in or expires_at, protected, stop_when_idle:
    see lifetime.clean) and say so in the instance's history, one event per kind of change (which
    webhooks get). ValidationError (400) for bad words, nothing changed; WrongStatus (409) for an
    instance being deleted or deleted."""
    changes = lifetime.clean(data, now=now or timezone.now())
    locked = Instance.objects.select_for_update().filter(pk=instance.pk, status__in=CHANGEABLE).first()
    if locked is None:
        instance.refresh_from_db()
        raise WrongStatus(instance, "change the lifetime of")
    if changes:
        # Not updated_at: it says when the status last changed (healing and recovery go by it).
        Instance.objects.filter(pk=instance.pk).update(**changes)
    for name, value in changes.items():
        setattr(instance, name, value)
    instance.status = locked.status
    for kind, sentence in lifetime.describe(changes):
        record_event(instance, locked.status, locked.status, f"{sentence} (by {by}).", type=kind)
    logger.info("Instance %s lifetime changed by %s: %s", instance.pk, by, changes)
    return instance


def extend(*, instance: Instance, data: dict[str, Any], by: object, now: datetime | None = None) -> Instance:
    """Move the instance's expiry: `expires_in` from now, or to `expires_at` (after now); null or
    "never" for never. Its warning is sent again before the new expiry."""
    given = {key: data[key] for key in lifetime.EXPIRY_FIELDS if key in data}
    if not given:
        raise ValidationError(
            {"expires_in": f"Give expires_in ({lifetime.EXPIRES_IN_RULE}) or expires_at ({lifetime.EXPIRES_AT_RULE})."}
        )
    return update(instance=instance, data=given, by=by, now=now)


def set_protected(*, instance: Instance, protected: bool, by: object) -> Instance:
    """Protect the instance (neither expiry nor a delete removes it), or stop protecting it."""
    return update(instance=instance, data={"protected": protected}, by=by)


# The reconciler's side -------------------------------------------------------------------


def _expirable() -> Any:
    return Instance.objects.filter(status__in=DELETABLE, protected=False, expires_at__isnull=False)


def warn_expiring(*, now: datetime) -> list[int]:
    """Record `instance.expiring` (which webhooks get) once for each instance that expires within
    STOCKROOM_EXPIRY_WARNING, and note when in expiry_warned_at. Returns their ids."""
    ahead: timedelta = settings.STOCKROOM_EXPIRY_WARNING
    warned = []
    # Busy ones too: they are deleted once the worker is done with them.
    due = Instance.objects.exclude(status__in=(Status.DELETING, Status.DELETED)).filter(
        protected=False, expiry_warned_at__isnull=True, expires_at__lte=now + ahead
    )
    for instance in due:
        with transaction.atomic():
            # Once per expiry: an extend in between resets expiry_warned_at for the new one.
            if not Instance.objects.filter(
                pk=instance.pk, expiry_warned_at__isnull=True, expires_at=instance.expires_at
            ).update(expiry_warned_at=now):
                continue
            assert instance.expires_at is not None
            left = instance.expires_at - now
            when = f"in {lifetime.spoken(left)}" if left > timedelta(0) else "now"
            record_event(
                instance,
                instance.status,
                instance.status,
                f"Expires at {instance.expires_at:%Y-%m-%d %H:%M:%S} UTC ({when}); it will be deleted then, "
                "with a snapshot kept. Extend it, or protect it, to keep it.",
                type=EXPIRING,
            )
        warned.append(instance.pk)
    return warned


def remove_expired(*, now: datetime) -> list[int]:
    """Delete each instance past its expiry, through the usual delete (its before-delete snapshot is
    kept), unless it is protected or busy. Returns their ids."""
    removed = []
    for instance in _expirable().filter(expires_at__lte=now):
        try:
            with transaction.atomic():
                # Still expired, unprotected and not busy once locked: its owner may have just acted.
                fresh = _expirable().select_for_update().filter(pk=instance.pk, expires_at__lte=now).first()
                if fresh is None:
                    continue
                assert fresh.expires_at is not None
                delete_instance(
                    instance=fresh, by=REMOVER, reason=f"Expired at {fresh.expires_at:%Y-%m-%d %H:%M:%S} UTC."
                )
        except WrongStatus as exc:  # it became busy; the next pass tries again
            logger.info("Expired instance %s not deleted yet: %s", instance.pk, exc)
            continue
        logger.info("Instance %s expired at %s; deleting it", instance.pk, instance.expires_at)
        removed.append(instance.pk)
    return removed


def watched_for_idleness() -> list[Instance]:
    """Running instances that are stopped when idle: the reconciler asks their servers for clients."""
    return list(Instance.objects.filter(status=Status.RUNNING, stop_when_idle__isnull=False).order_by("pk"))


def note_clients(instance: Instance, connections: int, *, now: datetime) -> bool:
    """The reconciler counted `connections` client connections on the running instance: a client
    ends its idleness; none starts it, and once it has lasted `stop_when_idle` the instance is
    stopped (data kept; a start brings it back). Returns whether a stop was asked for."""
    running = Instance.objects.filter(pk=instance.pk, status=Status.RUNNING, stop_when_idle__isnull=False)
    if connections:
        if instance.idle_since is not None:
            running.update(idle_since=None)
            instance.idle_since = None
        return False
    if instance.idle_since is None:
        running.filter(idle_since__isnull=True).update(idle_since=now)
        instance.idle_since = now
        return False
    assert instance.stop_when_idle is not None
    idle_for = timedelta(seconds=instance.stop_when_idle)
    if now - instance.idle_since < idle_for:
        return False
    reason = (
        f"No client connected for {lifetime.spoken(idle_for)} (stop_when_idle); "
        "stopping it, data kept. Start it again when it is needed."
    )
    try:
        request_action(instance=instance, action="stop", by=REMOVER, reason=reason)
    except WrongStatus:  # it changed meanwhile (a restart, a delete); the next pass looks again
        return False
    logger.info("Instance %s idle since %s; stopping it", instance.pk, instance.idle_since)
    return True
