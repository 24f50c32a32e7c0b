import time
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from knox.models import AbstractAuthToken
from knox.settings import CONSTANTS

from .fields import EncryptedTextField


class Status(models.TextChoices):
    PROVISIONING = "provisioning"
    RUNNING = "running"
    UNHEALTHY = "unhealthy"  # running, but it stopped answering; being restarted
    UNREACHABLE = "unreachable"  # its host is out of reach; it comes back, with its data, when the host does
    STOPPING = "stopping"
    STOPPED = "stopped"
    STARTING = "starting"
    RESTARTING = "restarting"
    ROTATING = "rotating"  # a new password is being set
    RESTORING = "restoring"  # its data is being replaced with a snapshot's
    IMPORTING = "importing"  # a file the owner uploaded is being loaded into it
    MOVING = "moving"  # going to another host with its data (a drain), or rebuilt there (an evacuation)
    DELETING = "deleting"
    DELETED = "deleted"
    FAILED = "failed"


# Statuses in which an instance holds resources: a port, a directory, maybe a process.
# A failed instance gives up its port (and may keep its data: see Instance.holds_data); a deleted
# one keeps only its history.
LIVE_STATUSES = tuple(status for status in Status if status not in (Status.FAILED, Status.DELETED))
# Statuses in which an instance's server runs or may run at any moment, so its memory reservation
# counts against the budget and its owner's quota: a stopped one reserves none until it starts.
RESERVING_STATUSES = tuple(status for status in LIVE_STATUSES if status != Status.STOPPED)
# Statuses in which a worker is (or should be) busy with the instance.
BUSY_STATUSES = (
    Status.PROVISIONING,
    Status.STOPPING,
    Status.STARTING,
    Status.RESTARTING,
    Status.ROTATING,
    Status.RESTORING,
    Status.IMPORTING,
    Status.MOVING,
    Status.DELETING,
)


# The same, as conditions: for counts that share one query (services/capacity.py).
HOLDING_DATA = Q(status__in=LIVE_STATUSES) | Q(status=Status.FAILED, holds_data=True)
RESERVING_MEMORY = Q(status__in=RESERVING_STATUSES)


class InstanceQuerySet(models.QuerySet["Instance"]):
    def visible(self) -> "InstanceQuerySet":
        """What users see: everything but deleted rows, which stay only for the record."""
        return self.exclude(status=Status.DELETED)

    def live(self) -> "InstanceQuerySet":
        return self.filter(status__in=LIVE_STATUSES)

    def holding_data(self) -> "InstanceQuerySet":
        """What the count quota counts: every live instance, and every failed one that kept its data."""
        return self.filter(HOLDING_DATA)

    def without_secrets(self) -> "InstanceQuerySet":
        """Rows whose encrypted fields are left undecrypted (each costs a decryption per row, per
        pass, at fleet scale); one that is read after all is loaded then, by a query of its own."""
        return self.defer("password", "admin_password", "tls_key")

    def reserving_memory(self) -> "InstanceQuerySet":
        """What the memory budget and quotas count: every instance whose server runs or may run."""
        return self.filter(RESERVING_MEMORY)


class Instance(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="instances")
    kind = models.CharField(max_length=16, help_text="The engine's kind, as in STOCKROOM_ENGINES.")
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
    # The engine's, for these options, set by create_instance (0 only in rows made without it).
    memory_reservation = models.PositiveBigIntegerField(
        default=0, help_text="Bytes the server is expected to use; counted against the memory budget and quota."
    )
    memory_limit = models.PositiveBigIntegerField(
        default=0, help_text="Bytes the server may use at most (the kernel's limit)."
    )
    # True from the create until the backend has removed the instance's data: a failed create
    # whose leftovers were removed, or a delete. It matters for failed instances: one that kept
    # its data (the healer gave up on it; a delete or a clean-up failed) still counts against the
    # quota, one whose data is gone does not. See InstanceQuerySet.holding_data().
    holds_data = models.BooleanField(
        default=True, help_text="Its data may still exist on the backend; it counts against the owner's quota."
    )
    # Health: restarts tried since the instance last answered, and when to try the next one.
    restart_attempts = models.PositiveIntegerField(default=0)
    next_restart_at = models.DateTimeField(null=True, blank=True)
    # A worker that acts on the instance holds it until then; see claim().
    claimed_until = models.DateTimeField(null=True, blank=True)
    # Times work on the instance's current busy status was taken over from a worker that died.
    recoveries = models.PositiveSmallIntegerField(default=0)
    # [host, port] a move to another host started from, until it is done: where the recovery of a
    # dead worker's move puts the server back (services/moves.py).
    move_source = models.JSONField(null=True, blank=True, help_text="Being moved from: [host, port].")
    # The snapshot a restore (or a clone's create) puts in, until it is done: what the recovery of a
    # dead worker's restore puts in again.
    restore_from = models.ForeignKey(
        "Snapshot", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="Being restored."
    )
    # With `restore_from`, a point-in-time restore: the whole second (UTC) to bring the data to.
    restore_until = models.DateTimeField(null=True, blank=True, help_text="Being restored to this time.")
    # A file the owner uploaded (an import, or a clone from a file), in the `snapshots` storage,
    # until a worker has loaded it; then removed.
    import_file = models.CharField(max_length=255, blank=True, help_text="Being imported (its name in the store).")
    # Point-in-time recovery. An in-place restore starts a new timeline: the snapshots and archived
    # logs of the old one never mix with the new one's.
    timeline = models.PositiveIntegerField(default=1)
    archived_until = models.DateTimeField(
        null=True, blank=True, help_text="Every write before this is in an archived log file (this timeline)."
    )
    # Seconds each step of the create took (queued, data_directory, server_start, first_login).
    timings = models.JSONField(default=dict, blank=True)
    # Changes after create. Options whose change waits for the next restart (the engine's
    # `apply="restart"` ones): name -> new value; the restart moves them into `options`.
    pending_options = models.JSONField(
        default=dict, blank=True, help_text="Options changed that take effect at the next restart."
    )
    # Throwaway instances: removed by the reconciler once expired (a before-delete snapshot kept),
    # unless protected; told ahead (instance.expiring) once, at expiry_warned_at.
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Deleted after this; empty: never.")
    expiry_warned_at = models.DateTimeField(
        null=True, blank=True, help_text="When instance.expiring was sent for the current expiry."
    )
    protected = models.BooleanField(default=False, help_text="Neither expiry nor DELETE removes it until cleared.")
    stop_when_idle = models.PositiveIntegerField(
        null=True, blank=True, help_text="Seconds without client connections after which it is stopped; empty: never."
    )
    idle_since = models.DateTimeField(null=True, blank=True, help_text="Since when no client has been connected.")
    # The version its running server reported at its last start (SELECT VERSION(), INFO server).
    server_version = models.CharField(max_length=100, blank=True)
    # TLS: the certificate for its public host that the portal's CA signed, and its key.
    tls_certificate = models.TextField(blank=True, help_text="PEM; signed by the portal's CA.")
    tls_key = EncryptedTextField(blank=True)
    tls_expires_at = models.DateTimeField(null=True, blank=True, help_text="When its certificate expires.")
    # The warm pool (services/pool.py): a server started ahead of time, with no tenant and the kind's
    # default options, owned by the pool's own user until a create takes it.
    pool = models.BooleanField(default=False, help_text="A warm-pool server: no tenant has taken it yet.")
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
            # The admin's list over every user's rows (100,000 of them, most deleted), newest first:
            # whole, filtered by status and by kind, a page without sorting them all, and counted
            # from the index.
            models.Index(fields=["-created_at", "-id"], name="instance_admin_order"),
            models.Index(fields=["status", "-created_at", "-id"], name="instance_status_order"),
            models.Index(fields=["kind", "-created_at", "-id"], name="instance_kind_order"),
            models.Index(fields=["expires_at"], condition=Q(expires_at__isnull=False), name="instance_expiry"),
            # A create looks for a ready pool server of its kind: a handful of rows at most.
            models.Index(fields=["kind", "backend", "status"], condition=Q(pool=True), name="instance_pool"),
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
            models.CheckConstraint(condition=Q(port__gte=1, port__lte=65535), name="port_in_range"),
            models.CheckConstraint(
                condition=Q(port__isnull=False) | Q(status__in=[Status.FAILED, Status.DELETING, Status.DELETED]),
                name="port_is_set_until_failure",
            ),
            models.CheckConstraint(
                condition=Q(memory_reservation__lte=F("memory_limit")), name="reservation_within_limit"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.name} ({self.status})"

    @property
    def live(self) -> bool:
        return self.status in LIVE_STATUSES

    @property
    def disk_limit(self) -> int:
        """The most bytes its data may take on disk: its `disk` option, else the default."""
        limit: int = self.options.get("disk") or settings.STOCKROOM_DEFAULT_DISK
        return limit

    def mark(self, step: str | None) -> None:
        """Record in `timings` the seconds since the previous mark under `step` (None: start the clock)."""
        now = time.perf_counter()
        started: Any = self.__dict__.get("_marked_at")
        if step is not None and started is not None:
            self.timings[step] = round(now - started, 4)
        self._marked_at = now


class SnapshotStatus(models.TextChoices):
    CREATING = "creating"
    READY = "ready"
    FAILED = "failed"


class SnapshotTrigger(models.TextChoices):
    MANUAL = "manual"
    SCHEDULED = "scheduled"
    BEFORE_DELETE = "before-delete"
    AFTER_RESTORE = "after-restore"  # the base of the timeline an in-place restore starts
    BEFORE_IMPORT = "before-import"  # an import's undo


class VerifyStatus(models.TextChoices):
    NONE = "", "not verified"
    VERIFYING = "verifying"
    PASSED = "passed"
    FAILED = "failed"


class Snapshot(models.Model):
    """A copy of an instance's data at one moment, in the `snapshots` storage (STORAGES), which
    outlives the instance: a restore or a clone puts it back."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="snapshots")
    kind = models.CharField(max_length=16)
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="snapshots")
    # What a clone needs once the instance is gone: its name (to show) and options (to start with).
    instance_name = models.CharField(max_length=40)
    options = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=SnapshotStatus.choices, default=SnapshotStatus.CREATING)
    status_message = models.TextField(blank=True)
    trigger = models.CharField(max_length=16, choices=SnapshotTrigger.choices, default=SnapshotTrigger.MANUAL)
    file = models.CharField(max_length=255, blank=True, help_text="Its name in the snapshots storage.")
    size_bytes = models.PositiveBigIntegerField(default=0)
    checksum = models.CharField(max_length=80, blank=True, help_text="sha256:<hex> of the file.")
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Removed after this; empty: kept.")
    timeline = models.PositiveIntegerField(default=1, help_text="The instance's timeline it was taken on.")
    # Where the log after it begins, in the engine's notation; "": it cannot be the base of a
    # point-in-time restore.
    log_start = models.CharField(max_length=255, blank=True)
    # Its last verify: restored into a throwaway server and checked there (services.exports).
    verify_status = models.CharField(max_length=16, choices=VerifyStatus.choices, blank=True, default="")
    verify_message = models.TextField(blank=True)
    verified_at = models.DateTimeField(
        null=True, blank=True, help_text="When its last verify ended (or, while verifying, began)."
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["owner", "kind", "-created_at", "-id"], name="snapshot_list_order"),
            models.Index(fields=["status"], name="snapshot_status"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=SnapshotStatus.values), name="snapshot_status_is_known"),
            models.CheckConstraint(condition=Q(trigger__in=SnapshotTrigger.values), name="snapshot_trigger_is_known"),
            models.CheckConstraint(
                condition=Q(verify_status__in=VerifyStatus.values), name="snapshot_verify_status_is_known"
            ),
            models.CheckConstraint(
                condition=~Q(status=SnapshotStatus.READY) | (Q(checksum__startswith="sha256:") & ~Q(file="")),
                name="ready_snapshot_has_file_and_checksum",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} snapshot {self.pk} of {self.instance_name} ({self.status})"


class LogFile(models.Model):
    """A closed log file of an instance (a binary log, an append-only file's incremental file),
    archived in the `snapshots` storage for point-in-time restores; it follows the snapshots of its
    timeline and is pruned with them."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="log_files")
    kind = models.CharField(max_length=16)
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.SET_NULL, related_name="log_files")
    timeline = models.PositiveIntegerField()
    name = models.CharField(max_length=255, help_text="The server's name for it.")
    file = models.CharField(max_length=255, help_text="Its name in the snapshots storage.")
    size_bytes = models.PositiveBigIntegerField(default=0)
    checksum = models.CharField(max_length=80, help_text="sha256:<hex> of the file.")
    opened_at = models.DateTimeField(null=True, blank=True, help_text="No write in it is older than this.")
    closed_at = models.DateTimeField(help_text="Every write in it is older than this.")

    class Meta:
        ordering = ["closed_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["instance", "timeline", "name"], name="one_log_file_per_name"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} log {self.name} of instance {self.instance_id} (timeline {self.timeline})"


class InstanceEvent(models.Model):
    """One status change of an instance, with the reason a person can read."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="events")
    from_status = models.CharField(max_length=16, choices=Status.choices, blank=True)
    to_status = models.CharField(max_length=16, choices=Status.choices)
    # What webhooks call it: a status change, or an outcome that changes no status (a backup).
    type = models.CharField(max_length=40, default="instance.status_changed")
    reason = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.from_status or '∅'} → {self.to_status}: {self.reason}"


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
    secret = EncryptedTextField(help_text="Signs each delivery (whsec_ + base64 of the key); shown to the owner once.")
    legacy_signature = models.BooleanField(
        default=False,
        help_text="Also send the old X-Stockroom-Signature header (for webhooks registered before v2).",
    )
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
    # The webhook-id header: the same on every attempt, so a receiver can drop one it has seen.
    message_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    status = models.CharField(max_length=16, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Counted when an attempt starts.")
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

    @property
    def msg_id(self) -> str:
        """Its webhook-id header, as receivers see it."""
        return f"msg_{self.message_id.hex}"


class CertificateAuthority(models.Model):
    """The portal's own CA, made once: it signs each instance's TLS certificate. Its key is kept
    encrypted (STOCKROOM_ENCRYPTION_KEYS) and only the portal reads it."""

    name = models.CharField(max_length=32, primary_key=True)
    certificate = models.TextField(help_text="PEM; what clients verify instances with.")
    key = EncryptedTextField()
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()

    class Meta:
        verbose_name = "certificate authority"
        verbose_name_plural = "certificate authority"

    def __str__(self) -> str:
        return f"{self.name} CA, expires {self.expires_at:%Y-%m-%d}"


class Heartbeat(models.Model):
    """When a periodic job last finished, and what it did; /healthz reads it."""

    name = models.CharField(max_length=32, primary_key=True)
    beat_at = models.DateTimeField(null=True, blank=True, help_text="When it last finished.")
    detail = models.TextField(blank=True)
    # Held while a run is in progress, so that runs never overlap; it expires should the runner die.
    running_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name}, last finished {self.beat_at or 'never'}"


class Lock(models.Model):
    """A row that transactions lock in turn (SELECT … FOR UPDATE), for checks that must not race
    across rows, such as the memory budget of the whole host. See services/capacity.py."""

    name = models.CharField(max_length=32, primary_key=True)

    def __str__(self) -> str:
        return self.name


class AccessToken(AbstractAuthToken):
    """An API token (django-rest-knox's model, KNOX_TOKEN_MODEL), named by its owner, with an expiry.

    The secret is never stored: `digest` is its SHA-512, and `token_key` its first 15 characters,
    which find the row and prove nothing. `expiry` None means it never expires.
    """

    # knox makes the digest the primary key; a plain id keeps digests out of URLs and the admin.
    id = models.BigAutoField(primary_key=True)
    digest = models.CharField(max_length=CONSTANTS.DIGEST_LENGTH, unique=True)
    name = models.CharField(max_length=100)
    last_used = models.DateTimeField(null=True, blank=True, help_text="Written at most once a minute.")

    class Meta:
        ordering = ["-created", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.user})"

    @property
    def expired(self) -> bool:
        return self.expiry is not None and self.expiry <= timezone.now()
