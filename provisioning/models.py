import logging
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections, models, transaction
from django.db.models import Q
from django.utils import timezone

from .fields import EncryptedTextField

logger = logging.getLogger(__name__)


class Kind(models.TextChoices):
    MYSQL = "mysql", "MySQL"
    REDIS = "redis", "Redis"


class Status(models.TextChoices):
    PROVISIONING = "provisioning"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"  # running, but it stopped answering; being restarted
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    RESTARTING = "restarting"
    ROTATING = "rotating"  # a new password is being set
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


# Statuses in which an instance holds resources: a port, a directory, maybe a process.
# A failed instance gives up its port; a deleted one keeps only its history.
LIVE_STATUSES = tuple(status for status in Status if status not in (Status.FAILED, Status.DELETED))
# Statuses in which a worker is (or should be) busy with the instance.
BUSY_STATUSES = (
    Status.PROVISIONING,
    Status.STOPPING,
    Status.STARTING,
    Status.RESTARTING,
    Status.ROTATING,
    Status.DELETING,
)


class InstanceQuerySet(models.QuerySet):
    def visible(self):
        """What users see: everything but deleted rows, which stay only for the record."""
        return self.exclude(status=Status.DELETED)

    def live(self):
        return self.filter(status__in=LIVE_STATUSES)


class Instance(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="instances")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    name = models.CharField(max_length=40)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROVISIONING)
    status_message = models.TextField(blank=True)
    backend = models.CharField(max_length=32, help_text="Alias in STOCKROOM_BACKENDS.")
    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(null=True, blank=True, help_text="Empty once the instance has failed.")
    database = models.CharField(max_length=64, blank=True)
    username = models.CharField(max_length=64)
    password = EncryptedTextField()
    admin_password = EncryptedTextField(help_text="The portal's own account on the instance.")
    options = models.JSONField(default=dict)
    # Health: restarts tried since the instance last answered, and when to try the next one.
    restart_attempts = models.PositiveIntegerField(default=0)
    next_restart_at = models.DateTimeField(null=True, blank=True)
    # A worker that acts on the instance holds it until then; see claim().
    claimed_until = models.DateTimeField(null=True, blank=True)
    # Times work on the instance's current busy status was taken over from a worker that died.
    recoveries = models.PositiveSmallIntegerField(default=0)
    # Seconds each step of the create took (queued, data_directory, server_start, first_login).
    timings = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = InstanceQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # A user's list, newest first, without sorting every row they have.
            models.Index(
                # status last: counting and skipping pages then never reads the table itself
                fields=["owner", "kind", "-created_at", "-id", "status"],
                condition=~Q(status=Status.DELETED),  # exactly what visible() asks for
                name="instance_list_order",
            ),
            models.Index(
                fields=["owner", "-created_at", "-id", "status"],
                condition=~Q(status=Status.DELETED),
                name="instance_dashboard_order",  # both kinds, as the dashboard lists them
            ),
            models.Index(fields=["status"], name="instance_status"),  # the reconciler's scans
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["host", "port"],
                condition=Q(status__in=LIVE_STATUSES),
                name="one_live_instance_per_host_port",
                violation_error_message="Another live instance holds this host and port.",
            ),
            models.UniqueConstraint(
                fields=["owner", "kind", "name"],
                condition=~Q(status=Status.DELETED),
                name="unique_name_per_owner_and_kind",
                violation_error_message="You already have an instance of this kind with this name.",
            ),
            models.CheckConstraint(condition=Q(status__in=Status.values), name="status_is_known"),
            models.CheckConstraint(condition=Q(kind__in=Kind.values), name="kind_is_known"),
            models.CheckConstraint(condition=Q(port__gte=1, port__lte=65535), name="port_in_range"),
            models.CheckConstraint(
                condition=Q(port__isnull=False) | Q(status__in=[Status.FAILED, Status.DELETING, Status.DELETED]),
                name="port_is_set_until_failure",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.status})"

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    def record_event(self, from_status: str, to_status: str, reason: str) -> "InstanceEvent":
        """Write the history entry for a status change and queue its webhook deliveries."""
        event = self.events.create(from_status=from_status, to_status=to_status, reason=reason)
        event.notify()
        return event

    def mark(self, step: str | None) -> None:
        """Record in `timings` the seconds since the previous mark under `step` (None: start the clock)."""
        now = time.perf_counter()
        started = self.__dict__.get("_marked_at")
        if step is not None and started is not None:
            self.timings[step] = round(now - started, 4)
        self._marked_at = now

    def claim(self, *, seconds: float) -> bool:
        """Take the instance unless another worker holds it (one UPDATE decides) and keep it until
        release(): a thread renews the claim every seconds/3, so only a dead worker's claim expires,
        `seconds` after its last renewal."""
        now = timezone.now()
        until = now + timedelta(seconds=seconds)
        taken = (
            Instance.objects.filter(pk=self.pk)
            .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
            .update(claimed_until=until)
        )
        if taken:
            self._claim_keeper = ClaimKeeper(self.pk, until, seconds)
            self._claim_keeper.start()
        return bool(taken)

    def release(self) -> None:
        """Give up this object's claim; a claim that expired and was taken by another worker stays."""
        keeper = self.__dict__.pop("_claim_keeper", None)
        if keeper is not None:
            Instance.objects.filter(pk=self.pk, claimed_until__in=keeper.stop()).update(claimed_until=None)

    def transition(self, to: Status, reason: str, *, allowed_from: tuple[Status, ...], unchanged_since=None) -> bool:
        """Move to `to` only if the current status is one of `allowed_from` (and, given
        `unchanged_since`, only if the row has not changed since that `updated_at`).

        The check and the change are one conditional UPDATE, so two workers can never both
        win; the winner records an event. Returns whether this call made the change.
        A failed instance holds nothing, so moving to FAILED also gives up the port.
        """
        changes = {"status": to, "status_message": reason, "updated_at": timezone.now()}
        if to not in BUSY_STATUSES:
            changes["recoveries"] = 0
        if to != Status.UNHEALTHY:
            changes["next_restart_at"] = None  # only an unhealthy instance waits for a restart
        if to == Status.FAILED:
            changes["port"] = None
        unchanged = Q() if unchanged_since is None else Q(updated_at=unchanged_since)
        with transaction.atomic():
            current = (
                Instance.objects.select_for_update()
                .filter(unchanged, pk=self.pk, status__in=allowed_from)
                .values_list("status", flat=True)
                .first()
            )
            changed = current is not None and bool(
                Instance.objects.filter(pk=self.pk, status=current).update(**changes)
            )
            if changed:
                self.record_event(current, to, reason)
        if changed:
            for field, value in changes.items():
                setattr(self, field, value)
        return changed


class ClaimKeeper(threading.Thread):
    """Renews one instance's claim while the worker that holds it is busy with it.

    It stops renewing after STOCKROOM_TASK_TIME_LIMIT, the most any task may take (Celery kills a
    task that runs longer), so a hung worker's claim lapses too. No lock is held during database
    I/O; release() clears whichever end the claim has: the current one or a renewal in flight.
    """

    def __init__(self, pk: int, until, seconds: float):
        super().__init__(name=f"claim-{pk}", daemon=True)
        self.pk, self.seconds = pk, seconds
        self.ends = [until]  # the claim's end, and a renewal's while it is being written
        self.give_up_at = time.monotonic() + settings.STOCKROOM_TASK_TIME_LIMIT
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.seconds / 3) and time.monotonic() < self.give_up_at:
                until = timezone.now() + timedelta(seconds=self.seconds)
                with self.lock:
                    current = self.ends[0]
                    self.ends.append(until)
                try:
                    renewed = Instance.objects.filter(pk=self.pk, claimed_until=current).update(claimed_until=until)
                except DatabaseError:  # a blip: keep the old end and try again next time
                    logger.warning("Could not renew the claim on instance %s", self.pk, exc_info=True)
                    close_old_connections()
                    renewed = None
                with self.lock:
                    self.ends = [until] if renewed else [current]
                if renewed == 0 and not self.stopped.is_set():
                    logger.error("Instance %s: the claim lapsed and was taken over", self.pk)
                    return
        finally:
            connections.close_all()  # this thread's own connection

    def stop(self) -> list:
        """Stop renewing; returns the ends the claim may have now."""
        with self.lock:
            self.stopped.set()
            return list(self.ends)


class InstanceEvent(models.Model):
    """One status change of an instance, with the reason a person can read."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=16, choices=Status.choices, blank=True)
    to_status = models.CharField(max_length=16, choices=Status.choices)
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.from_status or '∅'} → {self.to_status}: {self.reason}"

    def notify(self) -> None:
        """One delivery per webhook of the owner, sent by a worker once this transaction commits."""
        webhooks = Webhook.objects.filter(owner_id=self.instance.owner_id)
        deliveries = WebhookDelivery.objects.bulk_create(WebhookDelivery(webhook=hook, event=self) for hook in webhooks)
        if deliveries:
            from .webhooks import queue

            ids = [delivery.pk for delivery in deliveries]
            transaction.on_commit(lambda: queue(ids))


class Orphan(models.Model):
    """Something a backend runs or keeps for the portal that belongs to no instance.

    The reconciler records what it finds here (operators see it in the admin) and removes
    it once it has been an orphan for longer than STOCKROOM_ORPHAN_GRACE.
    """

    backend = models.CharField(max_length=32)
    key = models.CharField(max_length=255, help_text="What the backend calls it: a folder or a container.")
    description = models.TextField()
    first_seen = models.DateTimeField(auto_now_add=True)
    removed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-first_seen"]
        constraints = [
            models.UniqueConstraint(
                fields=["backend", "key"], condition=Q(removed_at__isnull=True), name="one_open_orphan_per_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.backend}: {self.key}"


class Webhook(models.Model):
    """A URL the owner wants told about every status change of their instances."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhooks")
    url = models.URLField(max_length=2000)
    secret = EncryptedTextField(help_text="Signs each delivery; shown to the owner once.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return self.url


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"  # not sent yet, or failed and waiting for its next attempt
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt failed


class WebhookDelivery(models.Model):
    """One event sent (or being sent) to one webhook, with the outcome of the last attempt."""

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    event = models.ForeignKey(InstanceEvent, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    response_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    # A worker sending it holds it until then; a pending delivery is (re)sent from then on.
    next_attempt_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=DeliveryStatus.values), name="delivery_status_is_known")
        ]

    def __str__(self) -> str:
        return f"{self.event} → {self.webhook} ({self.status})"


class Heartbeat(models.Model):
    """When a periodic job last finished, and what it did; /healthz reads it."""

    name = models.CharField(max_length=32, primary_key=True)
    beat_at = models.DateTimeField(null=True, blank=True, help_text="When it last finished.")
    detail = models.TextField(blank=True)
    # Held while a run is in progress, so that runs never overlap; it expires should the runner die.
    running_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name}, last finished {self.beat_at or 'never'}"
