"""Snapshots: taking them (request and worker side), restoring one in place, and putting one into a
clone. The bytes live in the `snapshots` storage (STORAGES, under STOCKROOM_SNAPSHOT_DIR by
default), never on an instance's own disk; each file's sha256 is checked before it is restored.

A snapshot is taken while the instance runs and serves: its status does not change, but the
worker holds its claim, so no restore, stop or delete runs at the same time. A restore moves the
instance to `restoring` and back to `running`.
"""

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Count, Max, Q
from django.utils import timezone

from ..backends.base import BackendError, BaseBackend
from ..engines import get_engine
from ..models import Instance, Snapshot, SnapshotStatus, SnapshotTrigger, Status
from ..options import backup_options, describe_size
from . import capacity, certificates, healing, jobs, logs, store, versions
from .capacity import QuotaExceeded
from .claims import work_on
from .outcomes import describe, with_note
from .requests import WrongStatus, enqueue
from .state import Side, record_event, transition

logger = logging.getLogger(__name__)

INTERVAL, RETENTION = backup_options()
BACKUP_COMPLETED = "instance.backup_completed"  # webhook types of a snapshot's outcome
BACKUP_FAILED = "instance.backup_failed"


class SnapshotBusy(Exception):
    """The snapshot cannot be used or removed now (409): it is being made, or being restored."""


# The request side ---------------------------------------------------------------------


def request_snapshot(*, instance: Instance, by: object, trigger: str = SnapshotTrigger.MANUAL) -> Snapshot:
    """Record a snapshot of the running instance as `creating`; a worker takes it after commit.

    Raises WrongStatus unless the instance is running, QuotaExceeded when the owner's snapshots
    already take STOCKROOM_SNAPSHOT_QUOTA_BYTES.
    """
    if instance.status != Status.RUNNING:
        raise WrongStatus(instance, "snapshot")
    with transaction.atomic():
        capacity.hold(instance.owner)
        check_quota(instance.owner)
        snapshot = _new(instance, trigger, status_message=f"Requested by {by}; waiting for a worker.")
        transaction.on_commit(lambda: _send_take(snapshot))
    return snapshot


def _new(instance: Instance, trigger: str, **fields: Any) -> Snapshot:
    """A snapshot row of `instance`, which keeps the instance's name and options for a clone."""
    return Snapshot.objects.create(
        owner=instance.owner,
        kind=instance.kind,
        instance=instance,
        instance_name=instance.name,
        options=instance.options,
        trigger=trigger,
        **fields,
    )


def check_quota(owner: User) -> None:
    """Raise QuotaExceeded if the owner's snapshots (those being made counted at their most) leave
    no room for another."""
    if store.room(owner) <= 0:
        quota = settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES
        raise QuotaExceeded(
            f"Your snapshots, with those being made, take all of your {describe_size(quota)} snapshot quota; "
            "delete some before taking another."
        )


def _send_take(snapshot: Snapshot) -> None:
    try:
        jobs.send("take_snapshot", snapshot.pk)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.error("Could not queue snapshot %s: %s", snapshot.pk, exc)
        _finish(snapshot, SnapshotStatus.FAILED, f"The job could not be queued ({type(exc).__name__}). Try again.")


def request_restore(
    *, instance: Instance, snapshot: Snapshot | None = None, until: datetime | None = None, by: object
) -> Instance:
    """Move the instance to `restoring`; a worker puts the snapshot's data in after commit, or with
    `until` (a whole second), its data as of that time. Either way a new timeline begins.

    The caller has checked that the snapshot is the owner's and of the instance's kind. Raises
    SnapshotBusy unless the snapshot is ready, WrongStatus unless the instance runs, and
    logs.OutsideWindow if `until` is outside the recovery window.
    """
    if until is not None:
        if instance.status not in (Status.RUNNING, Status.UNHEALTHY):
            raise WrongStatus(instance, "restore")
        snapshot = logs.base_for(instance, until)
        what = f"Restore to {until:%Y-%m-%d %H:%M:%S} UTC (from snapshot {snapshot.pk})"
    else:
        assert snapshot is not None, "a restore needs a snapshot or a time"
        what = f"Restore of snapshot {snapshot.pk}"
    if snapshot.status != SnapshotStatus.READY:
        raise SnapshotBusy(f"Snapshot {snapshot.pk} is {snapshot.status}; only a ready snapshot can be restored.")
    previous = Status(instance.status)
    if not transition(
        instance,
        Status.RESTORING,
        f"{what} requested by {by}.",
        side=Side.REQUEST,
        allowed_from=(Status.RUNNING, Status.UNHEALTHY),
        also={"restore_from": snapshot, "restore_until": until, "timeline": instance.timeline + 1},
    ):
        instance.refresh_from_db()
        raise WrongStatus(instance, "restore")
    transaction.on_commit(lambda: enqueue("restore_instance", instance, revert_to=previous))
    return instance


def busy(snapshot: Snapshot) -> str:
    """Why the snapshot cannot be deleted now (it is being made, or restored), or ""."""
    if snapshot.status == SnapshotStatus.CREATING:
        return f"Snapshot {snapshot.pk} is still being made; delete it once it is ready or failed."
    putting_in = (Status.PROVISIONING, Status.RESTORING, Status.IMPORTING)
    if Instance.objects.filter(restore_from=snapshot, status__in=putting_in).exists():
        return f"Snapshot {snapshot.pk} is being restored; delete it once that is done."
    return ""


def delete_snapshot(*, snapshot: Snapshot) -> None:
    """Remove the snapshot's file and row. Raises SnapshotBusy while it is being made or restored."""
    if why := busy(snapshot):
        raise SnapshotBusy(why)
    if snapshot.file:
        store.storage().delete(snapshot.file)
    snapshot.delete()


# The worker side ----------------------------------------------------------------------


def take(snapshot_id: int) -> None:
    """Take a `creating` snapshot, holding its instance's claim; Busy if another worker holds it."""
    snapshot = Snapshot.objects.filter(pk=snapshot_id, status=SnapshotStatus.CREATING).first()
    if snapshot is None:
        return
    if snapshot.instance_id is not None:
        work_on(snapshot.instance_id, (Status.RUNNING,), _take, snapshot)
    if Snapshot.objects.filter(pk=snapshot_id, status=SnapshotStatus.CREATING).exists():
        _finish(snapshot, SnapshotStatus.FAILED, "The instance was no longer running; no snapshot was taken.")


def _take(instance: Instance, backend: BaseBackend, snapshot: Snapshot) -> None:
    path = f"{instance.kind}/{instance.pk}/{snapshot.pk}.{get_engine(instance.kind).snapshot_suffix}"
    log_start = ""

    def fill(out: IO[bytes]) -> None:
        nonlocal log_start
        log_start = backend.snapshot(instance, out, logs.Archive(instance))

    try:
        name, checksum, size = store.keep(path, fill, most=store.limit(instance, besides=snapshot))
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        if _finish(snapshot, SnapshotStatus.FAILED, describe("The snapshot failed", instance, exc)):
            _announce(instance, snapshot)
        return
    if not _finish(
        snapshot,
        SnapshotStatus.READY,
        "",
        file=name,
        size_bytes=size,
        checksum=checksum,
        expires_at=_expiry(snapshot.trigger),
        timeline=instance.timeline,
        log_start=log_start,
    ):
        store.storage().delete(name)  # it was given up meanwhile
        return
    _announce(instance, snapshot)
    logger.info("Snapshot %s of instance %s: %s bytes", snapshot.pk, instance.pk, size)


def _announce(instance: Instance, snapshot: Snapshot) -> None:
    """A snapshot's outcome in the instance's history, and to its owner's webhooks; the one taken
    before a delete is told in the delete's own message."""
    if snapshot.trigger == SnapshotTrigger.BEFORE_DELETE:
        return
    what = f"Snapshot {snapshot.pk} ({snapshot.trigger})"
    if snapshot.status == SnapshotStatus.READY:
        kind, reason = BACKUP_COMPLETED, f"{what} is ready: {describe_size(snapshot.size_bytes)}."
    else:
        kind, reason = BACKUP_FAILED, f"{what} failed: {snapshot.status_message}"
    with transaction.atomic():
        record_event(instance, instance.status, instance.status, reason, type=kind)


def before_delete(instance: Instance, backend: BaseBackend) -> str:
    """Take the snapshot that undoes a delete, as the worker deleting the instance (which holds its
    claim); a sentence for the delete's status message saying what was kept. A server that does
    not answer cannot be copied consistently: then nothing is kept, and the delete goes on."""
    if settings.STOCKROOM_SNAPSHOT_KEEP_DAYS <= 0 or instance.pool:  # a pool server holds no data
        return ""
    if backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is not None:
        return "It was not running, so no snapshot of its data was kept."
    snapshot = _new(
        instance,
        SnapshotTrigger.BEFORE_DELETE,
        status_message="Taken before the delete.",
        expires_at=_expiry(SnapshotTrigger.BEFORE_DELETE),  # one a dead worker left goes too
    )
    _take(instance, backend, snapshot)
    if snapshot.status != SnapshotStatus.READY:
        snapshot.delete()  # it holds nothing, and would never expire
        return f"No snapshot of its data could be kept ({snapshot.status_message})."
    assert snapshot.expires_at is not None
    return (
        f"Snapshot {snapshot.pk} of its data is kept until {snapshot.expires_at:%Y-%m-%d %H:%M} UTC; "
        "a clone of it brings the data back."
    )


def _expiry(trigger: str) -> datetime | None:
    if trigger == SnapshotTrigger.BEFORE_DELETE:
        return timezone.now() + timedelta(days=settings.STOCKROOM_SNAPSHOT_KEEP_DAYS)
    return None


def _finish(snapshot: Snapshot, status: SnapshotStatus, message: str, **fields: object) -> bool:
    """Move a creating snapshot to `status`; False if it was no longer creating."""
    changes = {"status": status, "status_message": message, "finished_at": timezone.now(), **fields}
    done = bool(Snapshot.objects.filter(pk=snapshot.pk, status=SnapshotStatus.CREATING).update(**changes))
    if done:
        for field, value in changes.items():
            setattr(snapshot, field, value)
        if status == SnapshotStatus.FAILED:
            logger.warning("Snapshot %s failed: %s", snapshot.pk, message)
    return done


@contextmanager
def verified(snapshot: Snapshot) -> Iterator[IO[bytes]]:
    """The snapshot's file, open from its start, once its checksum matches; BackendError if not."""
    if snapshot.status != SnapshotStatus.READY:
        raise BackendError(f"Snapshot {snapshot.pk} is {snapshot.status}, not ready.")
    with store.open_checked(snapshot.file, snapshot.checksum, f"snapshot {snapshot.pk}") as file:
        yield file


def restore(instance_id: int) -> None:
    """Put the snapshot the instance is `restoring` from in place of its data."""
    work_on(instance_id, (Status.RESTORING,), restore_now)


def restore_now(instance: Instance, backend: BaseBackend) -> None:
    """The worker's restore (also what recovery does again after a dead worker): the server ends
    running with exactly the snapshot's data (or, restoring to a time, its data as of then), or, if
    that fails, unhealthy for the reconciler to start again, with its old data if the new never
    replaced it. A restored server's new timeline gets its first base snapshot at once."""
    snapshot, until = instance.restore_from, instance.restore_until
    try:
        if snapshot is None:
            raise BackendError("The snapshot was deleted before it could be restored.")
        certificates.ensure(instance)  # its server starts again: with TLS, with a certificate
        replay = logs.replay_for(instance, backend, snapshot, until) if until is not None else None
        with verified(snapshot) as file:
            backend.restore(instance, file, replay)
    except Exception as exc:  # noqa: BLE001 - every failure must end in a readable status
        message = describe("Restore failed", instance, exc)
        transition(
            instance, Status.UNHEALTHY, message, side=Side.WORKER, allowed_from=(Status.RESTORING,), also=_done()
        )
        return
    healing.forget_restarts(instance)
    Instance.objects.filter(pk=instance.pk).update(archived_until=None)  # of the old timeline
    instance.archived_until = None
    if until is not None:
        message = f"Restored to {until:%Y-%m-%d %H:%M:%S} UTC from snapshot {snapshot.pk}; a login succeeded."
    else:
        message = f"Restored snapshot {snapshot.pk} of {snapshot.created_at:%Y-%m-%d %H:%M:%S} UTC; a login succeeded."
    version, note = versions.after_start(instance, backend, data=versions.Data.REPLACED)
    message = with_note(message, note) + _new_timeline_base(instance, backend)
    transition(
        instance,
        Status.RUNNING,
        message,
        side=Side.WORKER,
        allowed_from=(Status.RESTORING,),
        also={**_done(), **version},
    )


def _new_timeline_base(instance: Instance, backend: BaseBackend) -> str:
    """Take the first base snapshot of the timeline a restore began, while the worker holds the
    instance; a sentence for the restore's message if it could not be taken."""
    if not get_engine(instance.kind).point_in_time:
        return ""
    snapshot = _new(
        instance, SnapshotTrigger.AFTER_RESTORE, status_message="The base of the timeline the restore began."
    )
    _take(instance, backend, snapshot)
    if snapshot.status != SnapshotStatus.READY:
        return f" Its recovery window begins with its next snapshot ({snapshot.status_message})."
    return ""


def _done() -> dict[str, object]:
    return {"restore_from": None, "restore_until": None}


# The reconciler's side ----------------------------------------------------------------


def schedule_backups(*, now: datetime) -> int:
    """Ask for the scheduled snapshots that are due: of each running instance whose last one is
    `backup_interval_hours` old; the first STOCKROOM_FIRST_BACKUP_AFTER after its create (or its
    interval, if shorter), so that its recovery window begins soon. One over the snapshot quota is
    recorded as failed, so that it is tried again an interval later, not at every pass."""
    last = Max("snapshots__created_at", filter=Q(snapshots__trigger=SnapshotTrigger.SCHEDULED))
    running = Instance.objects.filter(status=Status.RUNNING, pool=False)  # a pool server holds no data to keep
    due = []
    # What decides it only, as plain values: a pass reads every running instance, few are due.
    rows = running.annotate(last_backup=last).values_list("pk", "options", "created_at", "last_backup")
    for pk, options, created_at, last_backup in rows:
        hours = options.get(INTERVAL.name, INTERVAL.default)
        if not hours:
            continue
        every = timedelta(hours=hours)
        first = min(every, timedelta(seconds=settings.STOCKROOM_FIRST_BACKUP_AFTER))
        if (last_backup + every if last_backup else created_at + first) <= now:
            due.append(pk)
    requested = 0
    for instance in Instance.objects.filter(pk__in=due, status=Status.RUNNING).without_secrets().order_by("pk"):
        try:
            request_snapshot(instance=instance, by="the backup schedule", trigger=SnapshotTrigger.SCHEDULED)
        except QuotaExceeded as exc:
            snapshot = _new(
                instance,
                SnapshotTrigger.SCHEDULED,
                status=SnapshotStatus.FAILED,
                status_message=str(exc),
                finished_at=now,
            )
            _announce(instance, snapshot)
        except WrongStatus:  # it changed since the query: the next pass sees
            continue
        requested += 1
    return requested


AUTOMATIC = (SnapshotTrigger.SCHEDULED, SnapshotTrigger.AFTER_RESTORE)  # pruned by `backup_retention`


def prune_backups() -> int:
    """Remove the automatic snapshots (scheduled, and the bases restores took) beyond each
    instance's `backup_retention`, oldest first (ready and failed ones counted apart: a failure
    never pushes out a good backup)."""
    removed = 0
    automatic = Q(snapshots__trigger__in=AUTOMATIC) & ~Q(snapshots__status=SnapshotStatus.CREATING)
    candidates = Instance.objects.annotate(backups=Count("snapshots", filter=automatic)).filter(backups__gt=1)
    for instance in candidates:
        keep = instance.options.get(RETENTION.name, RETENTION.default)
        for status in (SnapshotStatus.READY, SnapshotStatus.FAILED):
            old = Snapshot.objects.filter(instance=instance, trigger__in=AUTOMATIC, status=status)[keep:]
            for snapshot in old:
                try:
                    delete_snapshot(snapshot=snapshot)
                    removed += 1
                except SnapshotBusy:
                    continue
    return removed


def fail_abandoned(*, now: datetime) -> int:
    """Mark failed the snapshots still `creating` whose worker died: no worker holds their instance
    and they are older than STOCKROOM_STUCK_TIMEOUT. The instance itself was never stopped."""
    cutoff = now - timedelta(seconds=settings.STOCKROOM_STUCK_TIMEOUT)
    abandoned = Snapshot.objects.filter(status=SnapshotStatus.CREATING, created_at__lt=cutoff).filter(
        Q(instance__isnull=True) | Q(instance__claimed_until__isnull=True) | Q(instance__claimed_until__lt=now)
    )
    count = 0
    for snapshot in abandoned:
        count += _finish(snapshot, SnapshotStatus.FAILED, "The worker taking it stopped; no snapshot was kept.")
    return count


def remove_expired(*, now: datetime) -> int:
    """Remove the snapshots whose keep time is over (those taken before a delete)."""
    count = 0
    for snapshot in Snapshot.objects.filter(expires_at__lt=now).exclude(status=SnapshotStatus.CREATING):
        try:
            delete_snapshot(snapshot=snapshot)
            count += 1
        except SnapshotBusy:
            continue
    return count


# What imports (services/imports.py) share: the snapshot that undoes one, taken by the worker that
# holds the instance, and the base of the timeline that putting data in place begins.
new = _new
take_now = _take
new_timeline_base = _new_timeline_base
