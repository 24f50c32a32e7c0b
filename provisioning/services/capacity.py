"""Capacity: what a user may hold and what the host has room for, checked before a create or a
start is admitted.

- The count quota (STOCKROOM_QUOTA) counts every instance that holds data (`holds_data`): live
  ones, and failed ones whose data is kept until their owner deletes them.
- Memory is counted in reservations (`Instance.memory_reservation`, from the engine) of every
  instance whose server runs or may run (`RESERVING_STATUSES`: all live statuses but stopped).
  Their sum must fit the host's STOCKROOM_MEMORY_BUDGET, and each owner's their
  STOCKROOM_MEMORY_QUOTA.

A check and the write it admits happen in one transaction, after hold(): the owner's row, then the
host-wide lock row, in that order everywhere, so two requests never both fit in the last room.
"""

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Q, Sum

from ..models import Instance, Lock
from ..options import describe_size
from . import store

HOST_LOCK = "memory-budget"


class QuotaExceeded(Exception):
    """The owner's quota would be exceeded (403)."""


class NoCapacity(Exception):
    """The host has no room for the request (503): its memory budget, or its ports, are spent."""


def hold(owner: User) -> None:
    """Wait for and hold, until the caller's transaction ends, the owner's row and then the
    host-wide lock, so that checks and the writes they admit never interleave."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("hold() only makes sense inside a transaction.")
    get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
    # The row is made on first use (a transactional test's flush removes it too); a concurrent
    # insert of it waits for this one on PostgreSQL, and SQLite runs one writer at a time anyway.
    Lock.objects.bulk_create([Lock(name=HOST_LOCK)], ignore_conflicts=True)
    Lock.objects.select_for_update().filter(name=HOST_LOCK).first()


@dataclass(frozen=True)
class Usage:
    """What an owner holds, against their quotas."""

    instances: int  # that hold data, failed ones whose data is kept included
    instance_quota: int
    memory_reserved: int  # bytes, by the instances that reserve memory (all live ones but stopped)
    memory_quota: int
    snapshot_storage: int  # bytes of ready snapshots and archived logs
    snapshot_quota: int


def usage(owner: User) -> Usage:
    reserved = (
        Instance.objects.reserving_memory().filter(owner=owner).aggregate(total=Sum("memory_reservation", default=0))
    )
    return Usage(
        instances=Instance.objects.filter(owner=owner).holding_data().count(),
        instance_quota=settings.STOCKROOM_QUOTA,
        memory_reserved=reserved["total"],
        memory_quota=settings.STOCKROOM_MEMORY_QUOTA,
        snapshot_storage=store.stored(owner),
        snapshot_quota=settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES,
    )


def check_count(owner: User) -> None:
    """Raise QuotaExceeded if the owner holds STOCKROOM_QUOTA instances with data already."""
    held = Instance.objects.filter(owner=owner).holding_data().count()
    if held >= settings.STOCKROOM_QUOTA:
        raise QuotaExceeded(
            f"Quota reached: you have {held} instances and the limit is {settings.STOCKROOM_QUOTA}. "
            "Failed instances whose data is kept count until you delete them. Delete one first."
        )


def check_memory(
    owner: User, needs: int, *, what: str, excluding: Instance | None = None, host_only: bool = False
) -> None:
    """Raise QuotaExceeded or NoCapacity unless `needs` more bytes of reservation fit the owner's
    quota and the host's budget. `excluding`: an instance whose own reservation must not count
    (the one being started, a pool server being taken). `host_only`: the budget alone (the warm
    pool's own servers, which no quota limits). Call it after hold()."""
    reserving = Instance.objects.reserving_memory()
    if excluding is not None:
        reserving = reserving.exclude(pk=excluding.pk)
    totals = reserving.aggregate(
        host=Sum("memory_reservation", default=0),
        mine=Sum("memory_reservation", default=0, filter=Q(owner=owner)),
    )
    quota, budget = settings.STOCKROOM_MEMORY_QUOTA, settings.STOCKROOM_MEMORY_BUDGET
    if totals["mine"] + needs > quota and not host_only:
        raise QuotaExceeded(
            f"Memory quota reached: your instances reserve {describe_size(totals['mine'])} of your "
            f"{describe_size(quota)} quota, and {what} needs {describe_size(needs)}. "
            "Stop or delete one of yours first, or choose smaller options."
        )
    if totals["host"] + needs > budget:
        raise NoCapacity(
            f"The host has no room for {what}: it needs {describe_size(needs)} of memory, and instances "
            f"reserve {describe_size(totals['host'])} of the host's {describe_size(budget)} budget. "
            "Free memory by stopping or deleting instances, or ask an operator to raise STOCKROOM_MEMORY_BUDGET."
        )
