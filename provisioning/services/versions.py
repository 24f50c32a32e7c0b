"""Engine versions: which server version each instance runs, and bringing its data up to a new one.

The worker reads the running server's version whenever it has started one (a create, start,
restart, restore, or the healer's restart) and writes it with the move to `running`. An instance
whose recorded version is not the one its backend would start now (`BaseBackend.host_version`: the
host's program, or the image) is flagged *restart to upgrade*: its server still runs the old
binaries. A start on other binaries than the data was last served by runs the engine's upgrade
(`Engine.upgrade`), and the instance's history says so.
"""

import enum
import logging
from typing import Any

from django.db import transaction
from django.db.models import Q, QuerySet

from ..backends.base import BaseBackend, get_backend
from ..engines import get_engine
from ..models import Instance, Status
from .outcomes import describe
from .state import record_event

logger = logging.getLogger(__name__)

UPGRADED = "instance.upgraded"  # the event (and webhook) type of an upgrade's outcome
# Statuses in which an instance has a server whose version was recorded, and that a restart serves.
HAS_SERVER = (
    Status.RUNNING,
    Status.UNHEALTHY,
    Status.STOPPING,
    Status.STOPPED,
    Status.STARTING,
    Status.RESTARTING,
    Status.ROTATING,
    Status.RESTORING,
    Status.IMPORTING,
)


class Data(enum.Enum):
    """Where the data of a server just started comes from, which says whether it may need upgrading."""

    NEW = "new"  # made by this very server (a create): nothing to upgrade
    KEPT = "kept"  # the instance's own (a start or restart): upgraded if its recorded version differs
    REPLACED = "replaced"  # a snapshot's, of whatever version took it (a restore): always asked


def after_start(instance: Instance, backend: BaseBackend, *, data: Data) -> tuple[dict[str, Any], str]:
    """What the worker writes with the move to `running` once a server has started: its version (as
    `transition(also=…)` fields) and a sentence for the status message ("" if none). Runs the
    engine's upgrade where the data may be of another version, and records an event when it did
    something or failed; then sets the options the server takes only once running
    (`Engine.start_settings`). Never raises: a version that cannot be read leaves the recorded one;
    an upgrade that failed leaves it too, so the instance stays flagged and the next restart tries
    again; a setting refused is said in the status message, and the server runs on.
    """
    fields, note = _version_after_start(instance, backend, data=data)
    settings = get_engine(instance.kind).start_settings(instance.options)
    if settings:
        try:
            backend.reconfigure(instance, settings, undo={})
        except Exception as exc:  # noqa: BLE001 - the server runs; the owner is told what it lacks
            refused = describe(f"{', '.join(f'{k} {v!r}' for k, v in settings.items())} was not set", instance, exc)
            logger.warning("Instance %s: %s", instance.pk, refused)
            note = f"{note} {refused.rstrip('.')}; the server keeps its default.".strip()
    return fields, note


def _version_after_start(instance: Instance, backend: BaseBackend, *, data: Data) -> tuple[dict[str, Any], str]:
    try:
        version = backend.server_version(instance)
    except Exception as exc:  # noqa: BLE001 - the server answers; its version is a detail
        logger.warning("Could not read the server version of instance %s: %s", instance.pk, exc)
        return {}, ""
    old = instance.server_version
    if data == Data.REPLACED or (data == Data.KEPT and version != old):
        try:
            done = backend.upgrade(instance)
        except Exception as exc:  # noqa: BLE001 - the server runs; the owner is told, the restart may be tried again
            why = describe(f"The server now runs {version}, but bringing its data up to it failed", instance, exc)
            _record(instance, f"{why.rstrip('.')}. Restart it to try again.")
            return {}, f"{why.rstrip('.')}."
        if done:
            was = f"from {old} " if old and old != version else ""
            sentence = f"Upgraded {was}to {version}: {done}"
            _record(instance, sentence)
            return {"server_version": version}, sentence
    return {"server_version": version}, ""


def _record(instance: Instance, reason: str) -> None:
    with transaction.atomic():
        record_event(instance, instance.status, instance.status, reason, type=UPGRADED)


def host_version(alias: str, kind: str) -> str | None:
    """The version backend `alias` would start a server of `kind` with now; None if it cannot say
    (the Docker daemon is down, say): then nothing is flagged."""
    try:
        return get_backend(alias).host_version(kind)
    except Exception as exc:  # noqa: BLE001 - pages and the API show the rest of the instance anyway
        logger.warning("Could not tell the %s server version of backend %s: %s", kind, alias, exc)
        return None


def upgrade_available(instance: Instance) -> bool:
    """Whether the instance's server runs another version than a restart would start: *restart to
    upgrade*."""
    if not instance.server_version or instance.status not in HAS_SERVER:
        return False
    host = host_version(instance.backend, instance.kind)
    return host is not None and host != instance.server_version


def needing_upgrade(instances: "QuerySet[Instance]", *, flagged: bool = True) -> "QuerySet[Instance]":
    """The instances of `instances` that `upgrade_available` flags (or, `flagged` False, those it
    does not), in one query: the host's version is asked once per backend and kind."""
    pairs = instances.order_by().values_list("backend", "kind").distinct()
    matches = Q(pk__in=[])
    for alias, kind in pairs:
        host = host_version(alias, kind)
        if host is not None:
            matches |= Q(backend=alias, kind=kind) & ~Q(server_version=host)
    matches &= Q(status__in=HAS_SERVER) & ~Q(server_version="")
    return instances.filter(matches) if flagged else instances.exclude(matches)
