"""Level-triggered reconciliation: compare what should be (the database) with what is.

One pass probes every instance that should answer, concurrently, then decides per instance
and hands slow work (restarts, recovery) to worker tasks, which claim the instance before
acting. Celery beat runs a pass every STOCKROOM_RECONCILE_INTERVAL seconds.
"""

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from .backends.base import BackendError, get_backend
from .models import BUSY_STATUSES, Heartbeat, Instance, Orphan, Status
from .services import certificates, expiry, exports, healing, logs, refill, snapshots, webhooks, work

logger = logging.getLogger(__name__)

PROBED = (Status.RUNNING, Status.UNHEALTHY, Status.UNREACHABLE)
HEARTBEAT = "reconciler"  # the Heartbeat row /healthz reads
TURN = timedelta(minutes=5)  # how long a pass holds its turn without renewing it (once per phase)


@dataclass
class Pass:
    """What one reconcile pass saw and did."""

    probed: int = 0
    unhealthy: list[int] = field(default_factory=list)
    unreachable: list[int] = field(default_factory=list)  # their host is out of reach
    recovered: list[int] = field(default_factory=list)
    heals: list[int] = field(default_factory=list)
    stuck: list[int] = field(default_factory=list)
    orphans: int = 0
    deliveries: int = 0
    snapshots_failed: int = 0
    snapshots_expired: int = 0
    backups_requested: int = 0
    backups_pruned: int = 0
    archives_queued: int = 0
    verifies_queued: int = 0
    verifies_failed: int = 0
    logs_pruned: int = 0
    certificates_renewed: int = 0
    pool_discarded: list[int] = field(default_factory=list)  # warm-pool servers that stopped answering
    pool_filled: dict[str, int] = field(default_factory=dict)  # kind -> pool servers asked for (or removed)
    expiring: list[int] = field(default_factory=list)  # warned of (instance.expiring) this pass
    expired: list[int] = field(default_factory=list)  # past their expiry: being deleted
    idle_stopped: list[int] = field(default_factory=list)  # no client for stop_when_idle: being stopped
    failed_phases: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # each phase's wall time, by its name
    skipped: bool = False  # another pass was still running

    def summary(self) -> str:
        """For the heartbeat, which /healthz shows to staff: counts, not instance ids."""
        text = (
            f"probed {self.probed}, unhealthy {len(self.unhealthy)}, unreachable {len(self.unreachable)}, "
            f"stuck {len(self.stuck)}, orphans {self.orphans}"
        )
        return text + (f"; failed: {', '.join(self.failed_phases)}" if self.failed_phases else "")


class Reconciler:
    clock = staticmethod(timezone.now)

    def _tend_snapshots(self, report: Pass, now: datetime) -> None:
        """Snapshots whose worker died are marked failed, those past their keep time removed;
        scheduled backups that are due are asked for, and old ones pruned; the log files of running
        instances are archived every STOCKROOM_LOG_ARCHIVE_INTERVAL, and those no restore can use
        any more pruned; verifies whose worker died are failed, and the newest snapshot of each instance
        is verified every STOCKROOM_VERIFY_EVERY_DAYS."""
        report.snapshots_failed = snapshots.fail_abandoned(now=now)
        report.snapshots_expired = snapshots.remove_expired(now=now)
        report.backups_requested = snapshots.schedule_backups(now=now)
        report.backups_pruned = snapshots.prune_backups()
        report.archives_queued = logs.schedule_archives(now=now)
        report.logs_pruned = logs.prune(now=now)
        report.verifies_failed = exports.fail_abandoned(now=now)
        report.verifies_queued = exports.schedule_verifies(now=now)

    def _renew_certificates(self, report: Pass, now: datetime) -> None:
        """TLS certificates that expire soon are renewed (services/certificates.py)."""
        report.certificates_renewed = certificates.renew_due(now=now)

    def run_once(self) -> Pass:
        report = Pass()
        now = self.clock()
        turn = self._take_turn(now)
        if turn is None:
            logger.warning("The previous reconcile pass is still running; skipping this one")
            report.skipped = True
            return report
        try:
            # One phase's trouble (a backend that errs, a broker that blinks) must not stop the others.
            phases = (
                # Before the probes, which log in as the tenant: their sessions must not count as clients.
                self._stop_idle,
                self._probe_and_heal,
                self._fill_pool,
                self._recover_stuck,
                self._track_orphans,
                self._resend_deliveries,
                self._tend_snapshots,
                self._renew_certificates,
                self._expire,
            )
            for phase in phases:
                started = time.perf_counter()
                try:
                    phase(report, now)
                except Exception:  # logged, and the pass goes on
                    logger.exception("Reconcile phase %s failed", phase.__name__)
                    report.failed_phases.append(phase.__name__)
                report.seconds[phase.__name__.lstrip("_")] = time.perf_counter() - started
                turn = self._keep_turn(turn)
                if turn is None:
                    logger.error("This reconcile pass lost its turn (it ran past %s); ending it", TURN)
                    report.failed_phases.append("lost its turn")
                    break
        finally:
            # /healthz reads beat_at: it moves only when every phase worked.
            done: dict[str, Any] = {"detail": report.summary(), "running_until": None}
            if not report.failed_phases:
                done["beat_at"] = self.clock()
            Heartbeat.objects.filter(name=HEARTBEAT, running_until=turn).update(**done)
        acted = report.expired or report.idle_stopped or report.pool_discarded or report.pool_filled
        health = report.unhealthy or report.unreachable or report.recovered or report.heals or report.stuck
        if health or report.failed_phases or acted:
            logger.info("Reconcile pass: %s", report)
        return report

    @staticmethod
    def _take_turn(now: datetime) -> datetime | None:
        """One pass at a time, across all workers. Returns the turn's end (which identifies it), or
        None while another pass holds it; a pass that died frees its turn after a while."""
        Heartbeat.objects.get_or_create(name=HEARTBEAT)
        until = now + TURN
        free = Q(running_until__isnull=True) | Q(running_until__lt=now)
        return until if Heartbeat.objects.filter(free, name=HEARTBEAT).update(running_until=until) else None

    def _keep_turn(self, turn: datetime | None) -> datetime | None:
        """Renew the turn between phases, so that only a pass that died loses it; None if lost."""
        until = self.clock() + TURN
        return (
            until if Heartbeat.objects.filter(name=HEARTBEAT, running_until=turn).update(running_until=until) else None
        )

    # Health ----------------------------------------------------------------------------

    def _probe_and_heal(self, report: Pass, now: datetime) -> None:
        # One query for them all; the probe logs in with the user's password, never the portal's own
        # (or the TLS key): those are not decrypted for every instance of every pass.
        probed = Instance.objects.filter(status__in=PROBED).defer("admin_password", "tls_key")
        instances = list(probed.order_by("pk"))
        report.probed = len(instances)
        with ThreadPoolExecutor(max_workers=settings.STOCKROOM_PROBE_CONCURRENCY) as pool:
            checks = list(pool.map(self._check, instances))
        for instance, (error, disk) in zip(instances, checks, strict=True):
            if instance.pool and error is not None:  # never healed: replaced by a fresh one
                refill.discard(instance, error)
                report.pool_discarded.append(instance.pk)
                continue
            if error is None and instance.status == Status.RUNNING:
                healing.disk_report(instance, disk)
            if error is None and instance.status in (Status.UNHEALTHY, Status.UNREACHABLE):
                if healing.answers_again(instance):
                    report.recovered.append(instance.pk)
            elif error is not None and (why := get_backend(instance.backend).unreachable(instance)):
                if instance.status != Status.UNREACHABLE and healing.out_of_reach(instance, error, why):
                    report.unreachable.append(instance.pk)
            elif error is not None and instance.status in (Status.RUNNING, Status.UNREACHABLE):
                if healing.stopped_answering(instance, error, now=now):
                    report.unhealthy.append(instance.pk)
                    if instance.next_restart_at is not None and instance.next_restart_at <= now:
                        report.heals.append(instance.pk)
            elif error is not None and instance.status == Status.UNHEALTHY and healing.restart_due(instance, now=now):
                healing.request_heal(instance)
                report.heals.append(instance.pk)

    @staticmethod
    def _check(instance: Instance) -> tuple[str | None, str | None]:
        """(why its login failed, what its disk says): the disk of a running server that answers
        only. One task per instance: a hand-off to a thread costs about what a login over a
        server's socket does."""
        backend = get_backend(instance.backend)
        # A second chance, so that one slow answer on a busy host does not get a server restarted.
        error = backend.login_error(instance, timeout=settings.STOCKROOM_PROBE_TIMEOUT, tries=2)
        if error is not None or instance.status != Status.RUNNING:
            return error, None
        try:
            return None, backend.enforce_disk_limit(instance)
        except Exception:  # the next pass tries again
            logger.exception("Could not check the disk of instance %s", instance.pk)
            return None, None

    def _fill_pool(self, report: Pass, now: datetime) -> None:
        """Start warm-pool servers where fewer are ready or starting than STOCKROOM_POOL asks."""
        report.pool_filled = {kind: count for kind, count in refill.fill().items() if count}

    # Throwaway and idle instances ------------------------------------------------------

    def _expire(self, report: Pass, now: datetime) -> None:
        """Warn of expiries ahead (instance.expiring), then delete the expired instances; the warning
        comes first, so even an instance that lived a few seconds gets it."""
        report.expiring = expiry.warn_expiring(now=now)
        report.expired = expiry.remove_expired(now=now)

    def _stop_idle(self, report: Pass, now: datetime) -> None:
        """Count the client connections of running instances that stop when idle; stop those idle long enough."""
        instances = expiry.watched_for_idleness()
        if not instances:
            return
        with ThreadPoolExecutor(max_workers=settings.STOCKROOM_PROBE_CONCURRENCY) as pool:
            counts = list(pool.map(self._clients, instances))
        for instance, count in zip(instances, counts, strict=True):
            if count is not None and expiry.note_clients(instance, count, now=now):
                report.idle_stopped.append(instance.pk)

    @staticmethod
    def _clients(instance: Instance) -> int | None:
        try:
            return get_backend(instance.backend).client_connections(instance)
        except Exception as exc:  # noqa: BLE001 - a server that does not answer is the probe's business
            logger.warning("Could not count the clients of instance %s: %s", instance.pk, exc)
            return None

    # Work a dead worker left behind ----------------------------------------------------

    def _recover_stuck(self, report: Pass, now: datetime) -> None:
        cutoff = now - timedelta(seconds=settings.STOCKROOM_STUCK_TIMEOUT)
        stuck = list(
            Instance.objects.filter(status__in=BUSY_STATUSES, updated_at__lt=cutoff).filter(
                Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
            )
        )
        work.recover_later(stuck, now=now)
        report.stuck.extend(instance.pk for instance in stuck)

    # Orphans ---------------------------------------------------------------------------

    def _track_orphans(self, report: Pass, now: datetime) -> None:
        grace = now - timedelta(seconds=settings.STOCKROOM_ORPHAN_GRACE)
        for alias in settings.STOCKROOM_BACKENDS:
            if alias != settings.STOCKROOM_DEFAULT_BACKEND and not Instance.objects.filter(backend=alias).exists():
                continue  # a backend nobody uses may not even be reachable
            backend = get_backend(alias)
            known = set(Instance.objects.visible().filter(backend=alias).values_list("pk", flat=True))
            try:
                found = backend.orphans(known)
            except BackendError as exc:
                logger.warning("Could not list orphans of %s: %s", alias, exc)
                continue
            report.orphans += len(found)
            open_rows = {row.key: row for row in Orphan.objects.filter(backend=alias, removed_at__isnull=True)}
            for key, row in open_rows.items():
                if key not in found:  # gone by itself, or adopted
                    row.delete()
            for key, description in found.items():
                row = open_rows.get(key) or Orphan.objects.create(backend=alias, key=key, description=description)
                if row.first_seen < grace:
                    logger.warning("Removing orphan %s of %s: %s", key, alias, description)
                    try:
                        backend.remove_orphan(key)
                    except Exception:  # it stays listed; the next pass tries again
                        logger.exception("Could not remove orphan %s of %s", key, alias)
                        continue
                    Orphan.objects.filter(pk=row.pk).update(removed_at=now)

    # Webhook deliveries whose queued retry was lost -------------------------------------

    def _resend_deliveries(self, report: Pass, now: datetime) -> None:
        # A retry is queued with a countdown; only those a full period overdue were lost.
        late = now - timedelta(seconds=settings.STOCKROOM_RECONCILE_INTERVAL)
        report.deliveries += webhooks.resend_due(late)
