"""Point-in-time recovery: each instance's closed log files (binary logs, append-only incremental
files) archived off its disk, beside its snapshots; the window a restore may go back to; the
replay a restore to a time runs on top of a base snapshot; pruning logs with their snapshots.

An instance's history is cut into timelines: an in-place restore starts a new one, whose window
begins at its first base snapshot (taken right after the restore). Bases and logs of different
timelines are never combined.
"""

import logging
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import IO

from django.conf import settings
from django.db.models import Min, OuterRef, QuerySet, Subquery
from django.utils import timezone

from ..backends.base import BackendError, BaseBackend, get_backend
from ..engines import ArchivedLog, Replay, get_engine
from ..models import Instance, LogFile, Snapshot, SnapshotStatus, Status
from . import claims, jobs, store
from .claims import work_on

logger = logging.getLogger(__name__)

SOURCE_WAIT = 60  # seconds a clone waits for its source's claim to archive the source's log


class OutsideWindow(ValueError):
    """The time asked for is outside the instance's recovery window (400)."""


class Archive:
    """The archive of one timeline of an instance (`LogArchive`, which engines fill)."""

    def __init__(self, instance: Instance, timeline: int | None = None):
        self.instance = instance
        self.timeline = instance.timeline if timeline is None else timeline

    def names(self) -> set[str]:
        archived = LogFile.objects.filter(instance=self.instance, timeline=self.timeline)
        return set(archived.values_list("name", flat=True))

    def save(self, name: str, fill: Callable[[IO[bytes]], None]) -> None:
        instance = self.instance
        # Every write in a file closed since the last pass is at or after that pass's cover.
        opened_at = Instance.objects.filter(pk=instance.pk).values_list("archived_until", flat=True).first()
        path = f"{instance.kind}/{instance.pk}/logs/{self.timeline}/{name}"
        stored, checksum, size = store.keep(path, fill, most=store.limit(instance))
        LogFile.objects.create(
            owner=instance.owner,
            kind=instance.kind,
            instance=instance,
            timeline=self.timeline,
            name=name,
            file=stored,
            size_bytes=size,
            checksum=checksum,
            opened_at=opened_at,
            closed_at=timezone.now(),
        )

    def covered(self, until: datetime) -> None:
        until = until.replace(microsecond=0)  # the whole seconds before it are complete
        Instance.objects.filter(pk=self.instance.pk).update(archived_until=until)
        self.instance.archived_until = until


# The window ---------------------------------------------------------------------------


def bases(instance: Instance) -> QuerySet[Snapshot]:
    """The snapshots a point-in-time restore of the instance's current timeline may start from."""
    return Snapshot.objects.filter(
        instance=instance,
        timeline=instance.timeline,
        status=SnapshotStatus.READY,
        finished_at__isnull=False,
    ).exclude(log_start="")


def with_first_base(instances: QuerySet[Instance]) -> QuerySet[Instance]:
    """`instances`, each with `first_base_at` (when its timeline's first base was finished), so
    that a list shows every recovery window in one query."""
    return instances.annotate(first_base_at=_first_base())


def _first_base() -> Subquery:
    return Subquery(
        Snapshot.objects.filter(
            instance=OuterRef("pk"),
            timeline=OuterRef("timeline"),
            status=SnapshotStatus.READY,
            finished_at__isnull=False,
        )
        .exclude(log_start="")
        .order_by("finished_at")
        .values("finished_at")[:1]
    )


def recovery_window(instance: Instance, *, now: datetime | None = None) -> tuple[datetime, datetime] | None:
    """The whole seconds (from, to) the instance can be restored or cloned to; None without a base.

    It begins at its timeline's first base snapshot. A running server's window ends now: the
    worker archives its log before it restores. Otherwise it ends where its archive does.
    """
    if not get_engine(instance.kind).point_in_time or not _backend_can(instance):
        return None
    if hasattr(instance, "first_base_at"):
        first = instance.first_base_at
    else:
        first = bases(instance).aggregate(first=Min("finished_at"))["first"]
    if first is None:
        return None
    start = _ceil_second(first)
    if instance.status == Status.RUNNING:
        end: datetime | None = (now or timezone.now()).replace(microsecond=0)
    else:
        end = instance.archived_until
    if end is None or end < start:
        return None
    return start, end


def _backend_can(instance: Instance) -> bool:
    try:
        return get_backend(instance.backend).point_in_time
    except KeyError:  # a backend no longer configured
        return False


def base_for(instance: Instance, until: datetime) -> Snapshot:
    """The base snapshot to restore `instance` to `until` from: the latest finished by then.
    Raises OutsideWindow, naming the window, if `until` is outside it."""
    window = recovery_window(instance)
    if window is None:
        raise OutsideWindow(
            f"Instance {instance.pk} has no recovery window yet: it begins with its first snapshot "
            "(of this timeline, after its last restore)."
        )
    start, end = window
    if not start <= until <= end:
        raise OutsideWindow(
            f"{until:%Y-%m-%dT%H:%M:%SZ} is outside instance {instance.pk}'s recovery window, "
            f"{start:%Y-%m-%dT%H:%M:%SZ} to {end:%Y-%m-%dT%H:%M:%SZ}."
        )
    base = bases(instance).filter(finished_at__lte=until).order_by("-finished_at").first()
    assert base is not None  # the window begins at the first base
    return base


def _ceil_second(moment: datetime) -> datetime:
    whole = moment.replace(microsecond=0)
    return whole if whole == moment else whole + timedelta(seconds=1)


# The worker side ----------------------------------------------------------------------


def archive(instance_id: int) -> None:
    """The reconciler's job: archive a running instance's closed log files."""
    work_on(instance_id, (Status.RUNNING,), archive_now)


def archive_now(instance: Instance, backend: BaseBackend) -> None:
    try:
        backend.archive_logs(instance, Archive(instance))
    except Exception as exc:  # noqa: BLE001 - the next pass tries again; the window just ends earlier
        logger.warning("Could not archive the log of instance %s: %s", instance.pk, exc)


def replay_for(restoring: Instance, backend: BaseBackend, base: Snapshot, until: datetime) -> Replay:
    """What `restoring` replays on top of `base` to reach `until`, once the base's instance has
    archived its log that far (its server is asked to while it runs). Raises BackendError if the
    archive does not reach `until`."""
    source = base.instance
    if source is None:
        raise BackendError(f"The instance of snapshot {base.pk} is gone, and so is its log.")
    if source.pk == restoring.pk:
        # Only on the first try: after a dead worker, the server may already hold the new data,
        # whose log must never join the old timeline's. (Recovery counts itself in the row only.)
        first_try = not Instance.objects.filter(pk=restoring.pk, recoveries__gt=0).exists()
        answers = backend.login_error(restoring, timeout=settings.STOCKROOM_PROBE_TIMEOUT) is None
        if first_try and answers:
            backend.archive_logs(restoring, Archive(restoring, base.timeline))
        covered = restoring.archived_until
    else:
        covered = _archive_source(source, base.timeline, until)
    if covered is None or covered < until:
        reach = f"{covered:%Y-%m-%dT%H:%M:%SZ}" if covered else "nowhere yet"
        raise BackendError(f"The log of instance {source.pk} is archived only up to {reach}; nothing was restored.")
    files = LogFile.objects.filter(instance=source, timeline=base.timeline).order_by("closed_at", "id")
    logs = [ArchivedLog(name=log.name, opened_at=log.opened_at, open=partial(_verified, log)) for log in files]
    return Replay(start=base.log_start, until=until, logs=logs)


def _archive_source(source: Instance, timeline: int, until: datetime) -> datetime | None:
    """Archive the source of a clone up to now if its archive does not reach `until` yet: it is
    another instance, whose claim is waited for."""
    source.refresh_from_db()
    if source.timeline != timeline or (source.archived_until is not None and source.archived_until >= until):
        return source.archived_until if source.timeline == timeline else None
    deadline = time.monotonic() + SOURCE_WAIT
    while source.status == Status.RUNNING and time.monotonic() < deadline:
        keeper = claims.claim(source, seconds=settings.STOCKROOM_CLAIM_SECONDS)
        if keeper is None:
            time.sleep(1)
            source.refresh_from_db()
            continue
        try:
            archive_now(source, get_backend(source.backend))
        finally:
            claims.release(source, keeper)
        break
    source.refresh_from_db()
    return source.archived_until if source.timeline == timeline else None


def _verified(log: LogFile) -> IO[bytes]:
    return store.open_checked(log.file, log.checksum, f"the archived log file {log.name}")


# The reconciler's side ----------------------------------------------------------------


def schedule_archives(*, now: datetime) -> int:
    """Queue the archiving of each running instance with a base snapshot on its timeline whose
    archive is STOCKROOM_LOG_ARCHIVE_INTERVAL old; returns how many."""
    due = now - timedelta(seconds=settings.STOCKROOM_LOG_ARCHIVE_INTERVAL)
    queued = 0
    running = Instance.objects.filter(status=Status.RUNNING).without_secrets().exclude(archived_until__gte=due)
    for instance in running.annotate(first_base_at=_first_base()).filter(first_base_at__isnull=False):
        if not get_engine(instance.kind).point_in_time or not _backend_can(instance):
            continue
        try:
            jobs.send("archive_logs", instance.pk)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
            logger.warning("Could not queue the log archiving of instance %s: %s", instance.pk, exc)
            break
        queued += 1
    return queued


def prune(*, now: datetime) -> int:
    """Remove the archived log files no restore can use any more: those that closed before the
    first base snapshot left on their timeline, and, once a day has passed, those of a timeline
    with no base at all that is not its instance's current one."""
    removed = 0
    groups = LogFile.objects.values_list("instance_id", "timeline").distinct()
    for instance_id, timeline in list(groups):
        logs = LogFile.objects.filter(instance_id=instance_id, timeline=timeline)
        first = (
            Snapshot.objects.filter(instance_id=instance_id, timeline=timeline, status=SnapshotStatus.READY)
            .exclude(log_start="")
            .aggregate(first=Min("created_at"))["first"]
        )
        if first is not None:
            old = logs.filter(closed_at__lt=first)
        else:
            current = Instance.objects.filter(pk=instance_id, timeline=timeline).exclude(status=Status.DELETED)
            if instance_id is not None and current.exists():
                continue
            old = logs.filter(closed_at__lt=now - timedelta(days=1))
        for log in old:
            store.storage().delete(log.file)
            log.delete()
            removed += 1
    return removed
