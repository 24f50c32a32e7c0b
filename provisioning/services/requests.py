"""The request side: what the API, pages and admin call. Validate, check the quotas and the
host's room (services/capacity.py), reserve, record, and queue the job for a worker once the
transaction commits."""

import logging
import re
import secrets
import threading
import time
from datetime import datetime
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from .. import crypto
from ..backends.base import get_backend
from ..engines import OptionErrors, get_engine
from ..errors import BackendError
from ..models import Instance, Snapshot, SnapshotStatus, Status
from . import capacity, jobs, logs, pool
from .actions import ACTIONS, DELETABLE
from .capacity import NoCapacity, QuotaExceeded
from .claims import Busy
from .lifetime import for_create as lifetime_for_create
from .ports import save_with_free_port
from .state import Side, record_event, transition

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z][a-z0-9-]{0,39}")
NAME_RULE = "1 to 40 characters: lower-case letters, digits and hyphens, starting with a letter."


class WrongStatus(Exception):
    """The instance is not in a status that allows the action."""

    def __init__(self, instance: Instance, action: str):
        super().__init__(f"Cannot {action} an instance that is {instance.status}.")
        self.instance = instance


class Protected(WrongStatus):
    """The instance is protected: it may not be deleted until `protected` is cleared."""

    def __init__(self, instance: Instance):
        Exception.__init__(
            self,
            f"Instance {instance.name} is protected: clear `protected` first (on its page, or PATCH it with "
            '{"protected": false}), then delete it.',
        )
        self.instance = instance


def create_instance(
    *,
    owner: User,
    kind: str,
    options: dict[str, Any],
    name: str | None = None,
    from_snapshot: Snapshot | None = None,
    from_instance: Instance | None = None,
    until: datetime | None = None,
    import_file: str = "",
    lifetime: dict[str, Any] | None = None,
) -> Instance:
    """Validate, reserve a port and record the instance; a worker starts it after commit.

    A clone (`from_snapshot`, a ready snapshot of the owner's of this kind) starts with the
    snapshot's data, its source's options unless `options` says otherwise, and new credentials.
    `lifetime` holds the owner's expires_in, expires_at, protected and stop_when_idle
    (services/lifetime.py; STOCKROOM_DEFAULT_TTL when it names no expiry).
    Raises ValidationError (bad name or options), QuotaExceeded (a quota of the owner's, 403) or
    NoCapacity (no room on the host: memory or ports, 503).
    """
    engine = get_engine(kind)
    if from_instance is not None:  # a clone of the instance as it was at `until`
        if until is None:
            raise ValidationError({"time": "A clone of an instance needs the time to clone it as of."})
        try:
            from_snapshot = logs.base_for(from_instance, until)
        except logs.OutsideWindow as exc:
            raise ValidationError({"time": str(exc)}) from None
    if from_snapshot is not None:
        if from_snapshot.status != SnapshotStatus.READY:
            raise ValidationError(
                {"from_snapshot": f"Snapshot {from_snapshot.pk} is {from_snapshot.status}, not ready."}
            )
        options = {**from_snapshot.options, **{key: value for key, value in options.items() if value is not None}}
    try:
        cleaned = engine.clean_options(options)
    except OptionErrors as exc:
        raise ValidationError(exc.errors) from None
    if name is not None and not NAME_PATTERN.fullmatch(name):
        raise ValidationError({"name": f"{name!r} is not a valid name; use {NAME_RULE}"})
    life = lifetime_for_create(lifetime or {}, now=timezone.now())
    started = time.monotonic()
    # Only a create from no data whose options differ from the defaults in live ones alone may take
    # a warm-pool server (services/pool.py).
    poolable = from_snapshot is None and not import_file and pool.size(kind) > 0
    changes = pool.differences(engine, cleaned) if poolable else None
    from_pool = changes is not None
    reservation = engine.memory_reservation(cleaned)
    what = f"a new {engine.label} instance"

    with transaction.atomic():
        # The quota, name and memory checks cannot race with another create or a start.
        capacity.hold(owner)
        name = name or f"{kind}-{secrets.token_hex(3)}"
        server = pool.candidate(kind, get_backend().alias) if from_pool else None  # its id
        # One read for the three checks. A pool server's reservation becomes the instance's: it is
        # not needed twice.
        held = capacity.holdings(owner, excluding=server, like=Q(kind=kind, name=name))
        capacity.check_count(owner, held)
        if held.matching:
            raise ValidationError({"name": f"You already have a {kind} instance named {name!r}."})
        capacity.check_memory(owner, reservation, what=what, held=held)
        fields: dict[str, Any] = {
            "name": name,
            "memory_reservation": reservation,
            "memory_limit": engine.memory_limit(cleaned),
        }
        taken = pool.take(server, owner=owner, options=cleaned, **fields, **life) if server is not None else None
        if not taken:
            if server is not None:  # another create took it first: the room it held is not this one's
                capacity.check_memory(owner, reservation, what=what)
            instance = record_new(
                owner=owner,
                kind=kind,
                options=cleaned,
                restore_from=from_snapshot,
                restore_until=until if from_instance is not None else None,
                import_file=import_file,
                **fields,
                **life,
            )
    if taken and not pool.hand_over(taken, changes or {}, started=started):
        enqueue("provision_instance", taken, revert_to=Status.FAILED)  # the cold path, for the same row
    if from_pool:  # a server taken, or none was ready: the pool is short
        pool.fill_later()
    if taken:
        return taken
    logger.info("Instance %s (%s) requested by %s on port %s", instance.pk, kind, owner, instance.port)
    return instance


def record_new(*, owner: User, kind: str, options: dict[str, Any], pool: bool = False, **fields: Any) -> Instance:
    """Record a new instance on the default backend, with a free port and passwords of its own, and
    queue its start for after the commit. Call it inside a transaction, once the checks are done
    (create_instance; the warm pool's fill, whose servers have `pool` set)."""
    engine, backend = get_engine(kind), get_backend()
    fields.setdefault("name", f"{kind}-{secrets.token_hex(3)}")
    fields.setdefault("memory_reservation", engine.memory_reservation(options))
    fields.setdefault("memory_limit", engine.memory_limit(options))
    host = backend.public_host
    if backend.places:  # the host with room on a backend of many hosts
        try:
            host = backend.place(fields["memory_reservation"], capacity.reserved_by_host(backend.alias))
        except BackendError as exc:  # no node has room (NoRoom), or the manager does not answer
            raise NoCapacity(str(exc)) from None
    instance = Instance(
        owner=owner,
        kind=kind,
        backend=backend.alias,
        host=host,
        options=options,
        status_message="Waiting for a worker to start the server.",
        password=crypto.generate_password(),
        admin_password=crypto.generate_password(),
        database=engine.database,
        username=engine.username,
        pool=pool,
        **fields,
    )
    save_with_free_port(instance, backend)
    source = ""
    if instance.restore_from is not None:
        source = f" as a clone of snapshot {instance.restore_from.pk}"
        if instance.restore_until is not None:
            when = f"{instance.restore_until:%Y-%m-%d %H:%M:%S} UTC"
            source = f" as a clone of instance {instance.restore_from.instance_id} at {when}"
    source = " seeded with an uploaded file" if instance.import_file else source
    source = " for the warm pool" if pool else source
    expiry = f" It expires at {instance.expires_at:%Y-%m-%d %H:%M:%S} UTC." if instance.expires_at else ""
    record_event(instance, "", Status.PROVISIONING, f"Requested by {owner}{source}.{expiry}")
    transaction.on_commit(lambda: enqueue("provision_instance", instance, revert_to=Status.FAILED))
    return instance


class _Waiters:
    """How many requests of this process wait for an instance now (`wait_until_started`)."""

    lock = threading.Lock()
    count = 0


def wait_until_started(instance: Instance, seconds: float) -> Instance:
    """Wait up to `seconds` for a new instance to leave provisioning (running, or failed), so that a
    create is one round trip; return it as it is then. At most STOCKROOM_WAITING_REQUESTS requests
    of this process wait at once, so waits never take every web thread: one beyond that returns at
    once, and its caller answers as if it had not asked to wait."""
    with _Waiters.lock:
        if instance.status != Status.PROVISIONING or _Waiters.count >= settings.STOCKROOM_WAITING_REQUESTS:
            return instance
        _Waiters.count += 1
    try:
        deadline, pause = time.monotonic() + seconds, 0.01
        while time.monotonic() < deadline:
            instance.refresh_from_db(fields=["status", "status_message", "port", "timings", "updated_at"])
            if instance.status != Status.PROVISIONING:
                instance.refresh_from_db()
                break
            time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
            pause = min(pause * 1.5, 0.25)  # a pooled or fast start is seen at once, a slow one polled less
        return instance
    finally:
        with _Waiters.lock:
            _Waiters.count -= 1


def delete_instance(*, instance: Instance, by: object, reason: str = "") -> Instance:
    """Mark the instance as deleting; a worker stops it and removes its data after commit.
    `reason` is what its history says, if not who asked.

    Raises Protected (a WrongStatus) while it is protected; WrongStatus while a worker is busy with
    the instance or it is already deleted.
    """
    previous = Status(instance.status)
    with transaction.atomic():
        # Locked, so that protecting it cannot slip in between the check and the change.
        if Instance.objects.select_for_update().filter(pk=instance.pk, protected=True).exists():
            instance.refresh_from_db()
            raise Protected(instance)
        moved = transition(
            instance,
            Status.DELETING,
            reason or f"Deletion requested by {by}.",
            side=Side.REQUEST,
            allowed_from=DELETABLE,
        )
    if not moved:
        instance.refresh_from_db()
        raise WrongStatus(instance, "delete")
    transaction.on_commit(lambda: enqueue("deprovision_instance", instance, revert_to=previous))
    return instance


def request_action(*, instance: Instance, action: str, by: object, reason: str = "") -> Instance:
    """Mark the instance busy with `action`; a worker carries it out after commit. `reason` is
    what its history says, if not who asked. A start counts its idleness afresh.

    Raises WrongStatus when the instance's status does not allow the action; for a start,
    QuotaExceeded or NoCapacity when its memory reservation does not fit.
    """
    spec = ACTIONS[action]
    previous = Status(instance.status)
    try:
        with transaction.atomic():
            if spec.reserves_memory:
                capacity.hold(instance.owner)
            moved = transition(
                instance,
                spec.busy,
                reason or f"{spec.title} requested by {by}.",
                side=Side.REQUEST,
                allowed_from=spec.allowed_from,
                also={"idle_since": None} if action == "start" else None,
            )
            if moved and spec.reserves_memory:  # a refusal rolls the transition back
                # As the row holds it now: a change after create may have resized it since it was read.
                needs = Instance.objects.filter(pk=instance.pk).values_list("memory_reservation", flat=True).get()
                capacity.check_memory(instance.owner, needs, what=instance.name, excluding=instance)
    except (QuotaExceeded, NoCapacity):
        instance.refresh_from_db()
        raise
    if not moved:
        instance.refresh_from_db()
        raise WrongStatus(instance, action.replace("-", " "))
    transaction.on_commit(lambda: enqueue("perform_action", instance, action, revert_to=previous))
    return instance


def enqueue(task_name: str, instance: Instance, *args: Any, revert_to: Status) -> None:
    """Send a task to the worker; if the broker is unreachable, say so in the status."""
    try:
        jobs.send(task_name, instance.pk, *args)
    except Busy:  # only when tasks run inline (tests): the reconciler's recovery takes over
        logger.warning("Instance %s was held by another worker; %s left to recovery", instance.pk, task_name)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.error("Could not queue %s for instance %s: %s", task_name, instance.pk, exc)
        transition(
            instance,
            revert_to,
            f"The job could not be queued: the task broker is unreachable ({type(exc).__name__}). Try again.",
            side=Side.REQUEST,
            allowed_from=(Status(instance.status),),
        )
