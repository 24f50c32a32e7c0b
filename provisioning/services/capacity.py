"""Capacity: what a user may hold and what the host has room for, checked before a create or a
start is admitted.

- The count quota (STOCKROOM_QUOTA) counts every instance that holds data (`holds_data`): live
  ones, and failed ones whose data is kept until their owner deletes them.
- Memory is counted in reservations (`Instance.memory_reservation`, from the engine) of every
  instance whose server runs or may run (`RESERVING_STATUSES`: all live statuses but stopped).
  Their sum must fit the host's STOCKROOM_MEMORY_BUDGET, and each owner's their
  STOCKROOM_MEMORY_QUOTA.

A check and the write it admits happen in one transaction, after hold(): the owner's row, then the
host-wide lock row, in that order everywhere, so two requests never both fit in the last room. (On
SQLite, whose transactions begin IMMEDIATE here, the transaction itself holds the one write lock.)
"""

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Aggregate, Count, Q, Sum

from ..models import HOLDING_DATA, RESERVING_MEMORY, Instance, Lock, Status
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
    connection = transaction.get_connection()
    if not connection.in_atomic_block:
        raise RuntimeError("hold() only makes sense inside a transaction.")
    if not connection.features.has_select_for_update and _begins_immediate(connection):
        return  # SQLite as settings.py sets it up: the transaction holds the one write lock since BEGIN
    get_user_model().objects.select_for_update().filter(pk=owner.pk).values_list("pk").first()
    host = Lock.objects.select_for_update().filter(name=HOST_LOCK).values_list("name")
    if host.first() is None:
        # The row is made on first use (a transactional test's flush removes it too); a concurrent
        # insert of it waits for this one on PostgreSQL, and SQLite runs one writer at a time anyway.
        Lock.objects.bulk_create([Lock(name=HOST_LOCK)], ignore_conflicts=True)
        host.first()


def _begins_immediate(connection: BaseDatabaseWrapper) -> bool:
    """Whether the database's transactions take its write lock as they begin (SQLite's IMMEDIATE)."""
    return bool(connection.settings_dict.get("OPTIONS", {}).get("transaction_mode") == "IMMEDIATE")


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


@dataclass(frozen=True)
class Held:
    """What an owner and the host hold, as the checks count it (`holdings`)."""

    instances: int  # the owner's that hold data (the count quota)
    mine: int  # bytes reserved by the owner's instances
    host: int  # bytes reserved by every instance on the host
    matching: int = 0  # the owner's instances, deleted ones aside, that match `like` (a name asked for)


def holdings(owner: User, *, excluding: int | None = None, like: Q | None = None) -> Held:
    """What check_count and check_memory count, in one query: `excluding` is the id of an instance
    whose reservation does not count (see check_memory). With `like`, also how many of the owner's
    instances match it: a create's checks are one read. Call it after hold()."""
    reserving = RESERVING_MEMORY if excluding is None else RESERVING_MEMORY & ~Q(pk=excluding)
    mine = Q(owner_id=owner.pk)  # not owner=owner: resolving the relation costs more than the query
    counts: dict[str, Aggregate] = {
        "instances": Count("pk", filter=mine & HOLDING_DATA),
        "mine": Sum("memory_reservation", default=0, filter=mine & reserving),
        "host": Sum("memory_reservation", default=0, filter=reserving),
    }
    if like is not None:
        counts["matching"] = Count("pk", filter=mine & ~Q(status=Status.DELETED) & like)
    return Held(**Instance.objects.aggregate(**counts))


def reserved_by_host(backend: str) -> dict[str, int]:
    """Host -> the bytes of memory reserved there by the instances of `backend` (one that `places`
    servers on many hosts). Call it after hold(), as the other checks."""
    rows = (
        Instance.objects.reserving_memory()
        .filter(backend=backend)
        .values("host")
        .annotate(total=Sum("memory_reservation", default=0))
    )
    return {row["host"]: row["total"] for row in rows}


def check_count(owner: User, held: Held) -> None:
    """Raise QuotaExceeded if the owner holds STOCKROOM_QUOTA instances with data already (`held`,
    from holdings)."""
    if held.instances >= settings.STOCKROOM_QUOTA:
        raise QuotaExceeded(
            f"Quota reached: you have {held.instances} instances and the limit is {settings.STOCKROOM_QUOTA}. "
            "Failed instances whose data is kept count until you delete them. Delete one first."
        )


def check_memory(
    owner: User,
    needs: int,
    *,
    what: str,
    excluding: Instance | None = None,
    host_only: bool = False,
    held: Held | None = None,
) -> None:
    """Raise QuotaExceeded or NoCapacity unless `needs` more bytes of reservation fit the owner's
    quota and the host's budget. `excluding`: an instance whose own reservation must not count
    (the one being started, a pool server being taken). `host_only`: the budget alone (the warm
    pool's own servers, which no quota limits). `held`: counted already (holdings, with the same
    `excluding`). Call it after hold()."""
    held = held or holdings(owner, excluding=None if excluding is None else excluding.pk)
    quota, budget = settings.STOCKROOM_MEMORY_QUOTA, settings.STOCKROOM_MEMORY_BUDGET
    if held.mine + needs > quota and not host_only:
        raise QuotaExceeded(
            f"Memory quota reached: your instances reserve {describe_size(held.mine)} of your "
            f"{describe_size(quota)} quota, and {what} needs {describe_size(needs)}. "
            "Stop or delete one of yours first, or choose smaller options."
        )
    if held.host + needs > budget:
        raise NoCapacity(
            f"The host has no room for {what}: it needs {describe_size(needs)} of memory, and instances "
            f"reserve {describe_size(held.host)} of the host's {describe_size(budget)} budget. "
            "Free memory by stopping or deleting instances, or ask an operator to raise STOCKROOM_MEMORY_BUDGET."
        )
