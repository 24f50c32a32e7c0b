"""Taking a snapshot's data out (export) and proving a snapshot restores (verify).

Both read the stored file once its checksum matches, and neither needs the snapshot's instance,
which may be gone: the backend loads the snapshot into a throwaway server in a throwaway folder of
the portal's, run by a uid of its own (`BaseBackend.export_snapshot`, `verify_snapshot`).

An export is made while the request waits and then streamed: a snapshot whose file is the
portable file (an RDB) is streamed as it is stored; another (a mariabackup copy) is first turned
into one (a gzipped `mariadb-dump`) in an unnamed file of the portal's. A verify is a
job: the request marks the snapshot `verifying`, and a worker restores and checks it.
"""

import logging
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import IO

from django.conf import settings
from django.db import transaction
from django.db.models import F, Max, Q
from django.utils import timezone

from ..backends.base import BackendError, BaseBackend, get_backend
from ..engines import Engine, get_engine
from ..engines.base import Bounded
from ..models import Instance, Snapshot, SnapshotStatus, VerifyStatus
from . import jobs, store
from .snapshots import SnapshotBusy

logger = logging.getLogger(__name__)

# Verifies the reconciler asks for in one pass: after a deploy every instance is due at once, and
# each loads a throwaway server; the rest wait for the next passes.
VERIFIES_PER_PASS = 2
# An export may take this many times its snapshot's size, and this much more: a dump is text.
EXPORT_GROWTH, EXPORT_SLACK = 4, 64 * 1024 * 1024


class ExportFailed(Exception):
    """The snapshot's file is missing or damaged, or could not be turned into a portable file (409)."""


@dataclass(frozen=True)
class Export:
    """A snapshot's portable file, open from its start, and what to call it."""

    file: IO[bytes]
    filename: str
    media_type: str


def export(*, snapshot: Snapshot) -> Export:
    """The snapshot's portable file (`Engine.export_suffix`). Raises SnapshotBusy unless it is
    ready, ExportFailed if its file is missing or damaged or cannot be turned into one."""
    _check_ready(snapshot, "exported")
    engine = get_engine(snapshot.kind)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", snapshot.instance_name) or snapshot.kind
    filename = f"{name}-snapshot-{snapshot.pk}.{engine.export_suffix}"
    try:
        return _export(snapshot, engine, filename)
    except BackendError as exc:
        raise ExportFailed(f"Snapshot {snapshot.pk} cannot be exported: {exc}") from exc


def _export(snapshot: Snapshot, engine: Engine, filename: str) -> Export:
    what = f"snapshot {snapshot.pk}"
    stored = store.open_checked(snapshot.file, snapshot.checksum, what, then="nothing was exported")
    if engine.export_is_snapshot:
        return Export(stored, filename, engine.export_media_type)
    with stored:
        made = tempfile.TemporaryFile(dir=settings.STOCKROOM_SNAPSHOT_DIR)  # unnamed: nothing to clean up
        limit = snapshot.size_bytes * EXPORT_GROWTH + EXPORT_SLACK
        try:
            bounded = Bounded(made, limit, f"The export passed {limit} bytes; it cannot be the snapshot's data.")
            _backend(snapshot).export_snapshot(
                snapshot.kind,
                stored,
                bounded,  # type: ignore[arg-type]
                database=_database(snapshot),
            )
        except BaseException:
            made.close()
            raise
    made.seek(0)
    return Export(made, filename, engine.export_media_type)


def _check_ready(snapshot: Snapshot, done: str) -> None:
    if snapshot.status != SnapshotStatus.READY:
        raise SnapshotBusy(f"Snapshot {snapshot.pk} is {snapshot.status}; only a ready snapshot can be {done}.")


def _backend(snapshot: Snapshot) -> BaseBackend:
    """The backend of the snapshot's instance (whose host has its kind's programs), else the default."""
    instance = _instance(snapshot)
    alias = instance.backend if instance is not None else None
    return get_backend(alias if alias in settings.STOCKROOM_BACKENDS else None)


def _database(snapshot: Snapshot) -> str:
    """The tenant's database in the snapshot: its instance's, or the one its kind makes."""
    instance = _instance(snapshot)
    return (instance.database if instance is not None else "") or get_engine(snapshot.kind).database


def _instance(snapshot: Snapshot) -> Instance | None:
    if snapshot.instance_id is None:
        return None
    return Instance.objects.filter(pk=snapshot.instance_id).only("backend", "database").first()


# Verify: the request side ----------------------------------------------------------------


def request_verify(*, snapshot: Snapshot, by: object) -> Snapshot:
    """Mark the ready snapshot `verifying`; a worker verifies it. SnapshotBusy unless it is ready
    and not being verified already."""
    _check_ready(snapshot, "verified")
    now = timezone.now()
    begun = Snapshot.objects.filter(pk=snapshot.pk, status=SnapshotStatus.READY).exclude(
        verify_status=VerifyStatus.VERIFYING
    )
    message = f"Requested by {by}; waiting for a worker."
    if not begun.update(verify_status=VerifyStatus.VERIFYING, verify_message=message, verified_at=now):
        raise SnapshotBusy(f"Snapshot {snapshot.pk} is being verified already.")
    snapshot.verify_status, snapshot.verify_message, snapshot.verified_at = VerifyStatus.VERIFYING, message, now
    transaction.on_commit(lambda: _send_verify(snapshot))
    return snapshot


def _send_verify(snapshot: Snapshot) -> None:
    try:
        jobs.send("verify_snapshot", snapshot.pk)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.error("Could not queue the verify of snapshot %s: %s", snapshot.pk, exc)
        _finish(snapshot, VerifyStatus.FAILED, f"The job could not be queued ({type(exc).__name__}). Try again.")


# Verify: the worker side -----------------------------------------------------------------


def verify(snapshot_id: int) -> None:
    """Verify a `verifying` snapshot: its file's checksum, then its data restored into a throwaway
    server and checked there by its engine; the result and its time are kept on the snapshot."""
    snapshot = Snapshot.objects.filter(pk=snapshot_id, verify_status=VerifyStatus.VERIFYING).first()
    if snapshot is None:
        return
    try:
        _check_ready(snapshot, "verified")
        then = "it cannot be restored"
        with store.open_checked(snapshot.file, snapshot.checksum, f"snapshot {snapshot.pk}", then=then) as file:
            found = _backend(snapshot).verify_snapshot(snapshot.kind, file, database=_database(snapshot))
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable result
        reason = str(exc) if isinstance(exc, BackendError | SnapshotBusy) else f"{type(exc).__name__}: {exc}"
        _finish(snapshot, VerifyStatus.FAILED, reason)
        return
    _finish(snapshot, VerifyStatus.PASSED, f"Its checksum matches. {found}")


def _finish(snapshot: Snapshot, result: VerifyStatus, message: str) -> bool:
    """End a verify with `result`; False if it was no longer verifying (another ended it)."""
    now = timezone.now()
    done = bool(
        Snapshot.objects.filter(pk=snapshot.pk, verify_status=VerifyStatus.VERIFYING).update(
            verify_status=result, verify_message=message, verified_at=now
        )
    )
    if done:
        snapshot.verify_status, snapshot.verify_message, snapshot.verified_at = result, message, now
        log = logger.warning if result == VerifyStatus.FAILED else logger.info
        log("Verify of snapshot %s: %s: %s", snapshot.pk, result, message)
    return done


# The reconciler's side -------------------------------------------------------------------


def schedule_verifies(*, now: datetime) -> int:
    """Ask for a verify of the newest ready snapshot of each instance none of whose snapshots was
    verified (or began to be) in the last STOCKROOM_VERIFY_EVERY_DAYS (0 days: never), of at most
    VERIFIES_PER_PASS instances, those waiting longest first."""
    days = settings.STOCKROOM_VERIFY_EVERY_DAYS
    if days <= 0:
        return 0
    since = now - timedelta(days=days)
    last = Max("snapshots__verified_at")
    due = (
        Instance.objects.visible()
        .filter(snapshots__status=SnapshotStatus.READY)
        .annotate(last_verified=last)
        .filter(Q(last_verified__isnull=True) | Q(last_verified__lt=since))
        .order_by(F("last_verified").asc(nulls_first=True), "pk")
    )
    requested = 0
    for instance in due:
        if requested >= VERIFIES_PER_PASS:
            break
        newest = Snapshot.objects.filter(instance=instance, status=SnapshotStatus.READY).first()
        if newest is None:
            continue
        try:
            request_verify(snapshot=newest, by="the verify schedule")
        except SnapshotBusy:  # it changed since the query: the next pass sees
            continue
        requested += 1
    return requested


def fail_abandoned(*, now: datetime) -> int:
    """End as failed the verifies whose worker died: `verifying` for longer than a task may run
    (STOCKROOM_TASK_TIME_LIMIT, after which Celery ends it) and STOCKROOM_STUCK_TIMEOUT more."""
    cutoff = now - timedelta(seconds=settings.STOCKROOM_TASK_TIME_LIMIT + settings.STOCKROOM_STUCK_TIMEOUT)
    count = 0
    for snapshot in Snapshot.objects.filter(verify_status=VerifyStatus.VERIFYING, verified_at__lt=cutoff):
        count += _finish(snapshot, VerifyStatus.FAILED, "The worker verifying it stopped; try again.")
    return count
