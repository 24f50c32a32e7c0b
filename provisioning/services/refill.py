"""Keeping the warm pool (services/pool.py) full: the worker's and the reconciler's side.

`fill` starts pool servers where the default backend has fewer than STOCKROOM_POOL[kind] and
removes those beyond it; the reconciler calls it every pass, and a create that took a server
queues it (`pool.fill_later`). `discard` deletes a pool server that stopped answering, so that the next
fill starts a fresh one.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q, QuerySet
from django.utils import timezone

from ..engines import engines, get_engine
from ..models import LIVE_STATUSES, Instance, Status
from . import capacity, pool
from .ports import NoFreePort
from .requests import WrongStatus, delete_instance, record_new

logger = logging.getLogger(__name__)

# A kind whose pool server failed to start this recently is not refilled: a broken host does not
# start (and fail) a server every reconcile pass. Its failed rows say why, in the admin.
FAILURE_PAUSE = timedelta(minutes=5)


def fill() -> dict[str, int]:
    """Bring each kind's pool to its size: kind -> servers asked for (negative: removed).

    Each new one is recorded as a create is and started by a worker, with the kind's default options.
    Not while a pool server of the kind failed within FAILURE_PAUSE, and not past the host's memory
    budget or ports: tenants come first. Servers beyond the size, or on a backend that is no longer
    the default, are deleted (the newest first: the oldest are taken first), and so are stopped ones
    (an operator stopped it, say): a pool server is never started again, nor handed out stopped.
    A pool that is as it should be costs one read, and no lock: the reconciler calls this every pass.
    """
    alias = settings.STOCKROOM_DEFAULT_BACKEND
    unsettled = [kind for kind, (usable, unusable) in _counts(alias).items() if usable != pool.size(kind) or unusable]
    if not unsettled:
        return {}
    try:
        user = pool.owner()
    except pool.NameTaken as exc:
        logger.error("%s", exc)
        return {}
    done = {}
    for kind in unsettled:
        engine = get_engine(kind)
        options = engine.clean_options({})
        with transaction.atomic():
            capacity.hold(user)  # one fill at a time: two never both count the same gap
            live = _live().filter(kind=kind)
            usable = _usable(alias)
            missing = pool.size(kind) - live.filter(usable).count()
            failed = Instance.objects.filter(
                pool=True, kind=kind, status=Status.FAILED, updated_at__gte=timezone.now() - FAILURE_PAUSE
            )
            asked = 0
            if missing > 0 and not failed.exists():
                while asked < missing:
                    try:
                        capacity.check_memory(
                            user, engine.memory_reservation(options), what="a warm-pool server", host_only=True
                        )
                        record_new(owner=user, kind=kind, options=options, pool=True)
                    except (capacity.NoCapacity, NoFreePort) as exc:
                        logger.info("The warm pool of %s stays short by %s: %s", kind, missing - asked, exc)
                        break
                    asked += 1
            stopped = list(live.filter(status=Status.STOPPED))
            beyond = list(live.exclude(usable).exclude(status=Status.STOPPED)) + list(
                live.filter(usable, status=Status.RUNNING).order_by("-pk")[: max(-missing, 0)]
            )
        for server in stopped:
            reason = "This warm-pool server was stopped; pool servers are never started again: it is replaced."
            asked -= _delete_if_unclaimed(server, by="the warm pool", reason=reason)
        for server in beyond:
            asked -= _delete_if_unclaimed(server, by="the warm pool", reason="The warm pool keeps fewer servers now.")
        done[kind] = asked
    return done


def _live() -> QuerySet[Instance]:
    """Pool servers still to reckon with: live, and not on their way out already (one being deleted
    neither counts towards the size nor is deleted again)."""
    return Instance.objects.filter(pool=True, status__in=LIVE_STATUSES).exclude(status=Status.DELETING)


def _usable(alias: str) -> Q:
    """Pool servers that count towards the size: starting or running on the default backend (`alias`)."""
    return Q(backend=alias, status__in=(Status.PROVISIONING, Status.RUNNING))


def _counts(alias: str) -> dict[str, tuple[int, int]]:
    """Kind -> live pool servers that count towards its size, and those that must go; one query."""
    rows = (
        _live()
        .values("kind")
        .annotate(usable=Count("pk", filter=_usable(alias)), unusable=Count("pk", filter=~_usable(alias)))
        .order_by()
    )
    found = {row["kind"]: (row["usable"], row["unusable"]) for row in rows}
    return {kind: found.get(kind, (0, 0)) for kind in engines()}


def discard(instance: Instance, error: str) -> None:
    """Delete a pool server that stopped answering; the next `fill` starts a fresh one."""
    reason = f"This warm-pool server stopped answering ({error}); it is removed and replaced."
    if _delete_if_unclaimed(instance, by="the reconciler", reason=reason):
        logger.warning("Warm-pool server %s stopped answering (%s); replacing it", instance.pk, error)


def _delete_if_unclaimed(server: Instance, *, by: str, reason: str) -> bool:
    """Delete the pool server unless a create took it since it was read (whatever was seen of it
    then is no reason to delete a tenant's instance): whether it is being deleted."""
    with transaction.atomic():  # the row locked, so that no create takes it between look and delete
        current = Instance.objects.select_for_update().filter(pk=server.pk, pool=True).first()
        if current is None:
            return False
        try:
            delete_instance(instance=current, by=by, reason=reason)
        except WrongStatus:  # a create holds it, or it is going already
            return False
    return True
