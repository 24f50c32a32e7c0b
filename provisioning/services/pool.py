"""The warm pool: servers started ahead of time with no tenant, so that a create is running within
its own request.

A pool server is an instance row with `pool` set, owned by the pool's own user (which cannot sign
in), made and started by a worker like any instance: the kind's default options, a port, a uid and
passwords of its own. It counts in the host's memory budget and the reconciler probes it; one that
stops answering is deleted and replaced, never healed: services/refill.py keeps STOCKROOM_POOL[kind]
of them on the default backend.

A create takes one (`take`, from services/requests.py) when its options differ from the defaults
only in live ones and it starts from no data (no clone, no file). In the create's transaction one
conditional UPDATE gives the server to the owner, so no server is handed out twice; then, in the
request and under the instance's claim, `hand_over` gives the user a new password (the pool's stops
working), applies the options that differ live, with the memory limit, and logs in with the
user's credentials: the instance is running. A pool server is fresh, never recycled: nobody but the
portal ever had its credentials, and a server a tenant held is deleted, never put back.
If the hand-over fails the same row takes the cold path: a worker makes its server from nothing
(create_instance queues it, as it queues any create).
"""

import logging
import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import User
from django.db.models import Count, Q
from django.utils import timezone

from .. import crypto
from ..backends.base import get_backend
from ..engines import Engine, engines, get_engine
from ..models import Instance, Status
from ..options import LIVE
from . import jobs
from .outcomes import describe
from .state import Side, record_event, transition

logger = logging.getLogger(__name__)

USERNAME = "stockroom-pool"  # owns every pool server until a create takes it


def size(kind: str) -> int:
    """How many pool servers of `kind` the default backend keeps ready (0: no pool)."""
    return int(settings.STOCKROOM_POOL.get(kind, 0))


class NameTaken(Exception):
    """A user who can sign in is called USERNAME: the pool's servers would be theirs to see."""


def owner() -> User:
    """The pool's own user: inactive, with no password, so nobody signs in as it. Raises NameTaken
    if a user of that name who may sign in exists already: no pool is made then."""
    user, made = get_user_model().objects.get_or_create(username=USERNAME, defaults={"is_active": False})
    if made:
        user.set_unusable_password()
        user.save(update_fields=["password"])
    elif user.is_active or user.has_usable_password():
        raise NameTaken(
            f"A user who can sign in is called {USERNAME!r}; the warm pool, whose servers that user would own, "
            "stays empty until an operator renames that user."
        )
    return user


def differences(engine: Engine, options: dict[str, Any]) -> dict[str, Any] | None:
    """The options (cleaned) that differ from a pool server's, which runs the defaults; None if one
    of them cannot be applied to a running server (`Option.apply` is not live)."""
    defaults = engine.clean_options({})
    changed = {name: value for name, value in options.items() if value != defaults.get(name)}
    if any(engine.option(name).apply != LIVE for name in changed):
        return None
    return changed


def candidate(kind: str, alias: str) -> int | None:
    """The id of a ready pool server of `kind` on the backend `alias`: running, held by no one, and
    running the defaults (an operator may have changed one's options in the admin: that one is not
    handed out)."""
    now = timezone.now()
    servers = (
        Instance.objects.filter(pool=True, kind=kind, backend=alias, status=Status.RUNNING, pending_options={})
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .order_by("pk")
        .values_list("pk", "options")  # no row made, no secret decrypted for a look: take() reads the one it gets
    )
    defaults = get_engine(kind).clean_options({})
    return next((pk for pk, options in servers[:10] if options == defaults), None)


def take(server_id: int, **fields: Any) -> Instance | None:
    """Give the pool server `server_id` to its new owner (`fields`: owner, name, options, memory and
    lifetime): one conditional UPDATE, so that of two creates only one gets it; None if another did.
    The instance is provisioning, and held (its claim) for `hand_over`, which must follow the commit.
    Call it inside the create's transaction, after the owner's quotas were checked."""
    now = timezone.now()
    fields |= {
        "pool": False,
        "status": Status.PROVISIONING,
        "status_message": "Taking a server from the warm pool.",
        "password": crypto.generate_password(),
        "created_at": now,
        "updated_at": now,
        "claimed_until": now + timedelta(seconds=settings.STOCKROOM_CLAIM_SECONDS),
        "timings": {},
    }
    free = Q(claimed_until__isnull=True) | Q(claimed_until__lt=now)
    if not Instance.objects.filter(free, pk=server_id, pool=True, status=Status.RUNNING).update(**fields):
        return None
    # Its history keeps how the pool started it (no tenant's data is in it): when, and with what.
    instance = Instance.objects.get(pk=server_id)
    instance.owner = owner = fields["owner"]  # as it was given: not read again
    record_event(instance, "", Status.PROVISIONING, f"Requested by {owner}; taken from the warm pool.")
    return instance


def hand_over(instance: Instance, changes: dict[str, Any], *, started: float) -> bool:
    """Make the taken pool server the tenant's (see the module's text): `changes` are its options
    that differ from the pool's (`differences`), `started` is when the request began
    (time.monotonic), for its timings. False if that failed: its server is removed, the instance
    takes the cold path, its claim released and its status saying why, and the caller queues its
    provision job (requests.enqueue, which says so in the status if the broker is down)."""
    backend, engine = get_backend(instance.backend), get_engine(instance.kind)
    defaults = engine.clean_options({})
    to_server = {name: value for name, value in changes.items() if name in engine.live_settings}
    limit = engine.memory_limit(instance.options)
    try:
        backend.set_password(instance, instance.password)  # the pool's own stops working now
        if to_server or limit != engine.memory_limit(defaults):
            undo = {name: defaults[name] for name in to_server}
            backend.reconfigure(instance, to_server, undo=undo, memory_limit=limit)
            backend.keep_config(instance)
        backend.probe(instance)
    except Exception as exc:  # noqa: BLE001 - whatever went wrong, a worker makes the server from nothing
        why = describe("The warm-pool server could not be handed over", instance, exc)
        logger.warning("Instance %s: %s; taking the cold path", instance.pk, why)
        message = f"{why.rstrip('.')}. A new server is being made instead."
        try:  # half handed over, it is nobody's: gone now, not only once a worker remakes it
            backend.destroy(instance)
        except Exception:  # the worker's create destroys what is left first, as every create does
            logger.exception("Instance %s: could not remove the warm-pool server it was handed", instance.pk)
        Instance.objects.filter(pk=instance.pk).update(status_message=message, claimed_until=None)
        instance.status_message, instance.claimed_until = message, None
        return False
    timings = {"pool": round(time.monotonic() - started, 4)}
    if transition(
        instance,
        Status.RUNNING,
        "Taken from the warm pool; a login with the user's credentials succeeded.",
        side=Side.WORKER,  # the request does the worker's part itself, holding the instance's claim
        allowed_from=(Status.PROVISIONING,),
        also={"timings": timings, "claimed_until": None},
    ):
        logger.info("Instance %s was taken from the warm pool in %.3f s", instance.pk, timings["pool"])
    else:  # deleted meanwhile, say: what its owner decided stands
        Instance.objects.filter(pk=instance.pk).update(claimed_until=None)
    return True


# Seconds a refill waits: starting servers takes CPU, which on a host of few cores the creates that
# emptied the pool need first (each answered within its request, and a burst of them at once).
REFILL_DELAY = 0.5


def fill_later() -> None:
    """Queue a refill (services/refill.py), to start after REFILL_DELAY; a broker that is down only
    delays it: the reconciler fills the pool every pass."""
    try:
        jobs.send("fill_pool", countdown=REFILL_DELAY)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.warning("Could not queue a refill of the warm pool: %s", exc)


def summary() -> dict[str, dict[str, int]]:
    """Kind -> ready, starting and wanted pool servers on the default backend: for /healthz and the admin."""
    alias = settings.STOCKROOM_DEFAULT_BACKEND
    counts = (
        Instance.objects.filter(pool=True, backend=alias, status__in=(Status.RUNNING, Status.PROVISIONING))
        .values("kind")
        .annotate(
            ready=Count("pk", filter=Q(status=Status.RUNNING)),
            starting=Count("pk", filter=Q(status=Status.PROVISIONING)),
        )
    )
    found = {row["kind"]: {"ready": row["ready"], "starting": row["starting"]} for row in counts}
    empty = {"ready": 0, "starting": 0}
    return {kind: {**empty, **found.get(kind, {}), "wanted": size(kind)} for kind in engines()}
