"""Which port an instance holds: taken when it is created, and taken again when a stranger took it.

The database is the arbiter: a partial unique index allows one live instance per host and port, so
two workers (or a create and a start) can never take the same port; the backend says whether
anything outside the portal listens on a port.
"""

import logging
from collections.abc import Callable

from django.conf import settings
from django.db import IntegrityError, transaction

from ..backends.base import BackendError, BaseBackend, get_backend
from ..models import Instance
from .capacity import NoCapacity

logger = logging.getLogger(__name__)


class NoFreePort(NoCapacity):
    """Every port in STOCKROOM_PORT_RANGE is taken."""


def save_with_free_port(instance: Instance, backend: BaseBackend) -> None:
    """Save a new instance with the lowest port in range that no live instance holds and nothing
    listens on. Raises NoFreePort."""

    def take(port: int) -> None:
        instance.port = port
        instance.save()

    _take_free_port(instance, backend, take)


def take_on(instance: Instance, backend: BaseBackend, host: str) -> None:
    """Give `instance` `host` and the lowest port free there (a move to another host of a backend
    that places servers), in the database. Raises NoFreePort."""
    old_host, old_port = instance.host, instance.port

    def take(port: int) -> None:
        if not Instance.objects.filter(pk=instance.pk, host=old_host, port=old_port).update(host=host, port=port):
            raise BackendError("The instance changed while a port was chosen for it on its new host; try again.")
        instance.port = port

    instance.host = host
    try:
        _take_free_port(instance, backend, take)
    except BaseException:
        instance.host, instance.port = old_host, old_port
        raise


def move_if_taken(instance: Instance, backend: BaseBackend, *, creating: bool = False) -> str:
    """Before an instance's server is created or started: if something other than the instance
    listens on its port, give it a free port instead (the backend starts it there).

    Returns "" or a sentence for the status and the event saying where it moved. Raises
    BackendError if the port is taken and the instance cannot move (a start on a backend that
    does not `moves_ports`; every backend creates a server on the port the instance has then).
    """
    old = instance.port
    assert old is not None, "only an instance that holds a port is started"
    if backend.port_is_free(old) or backend.holds_port(instance):
        return ""
    if not (creating or backend.moves_ports):
        raise BackendError(
            f"Port {old} is taken by another process, and the {backend.alias} backend cannot move an instance "
            "to another port."
        )

    def take(port: int) -> None:
        # Still ours and still on the old port: the worker holds the claim, but a row is a row.
        if not Instance.objects.filter(pk=instance.pk, port=old).update(port=port):
            raise BackendError("The instance changed while a new port was chosen for it; try again.")
        instance.port = port

    try:
        _take_free_port(instance, backend, take)
    except NoFreePort as exc:
        raise BackendError(f"Port {old} is taken by another process. {exc}") from None
    note = f"Port {old} was taken by another process; moved to {instance.port}."
    logger.warning("Instance %s: %s", instance.pk, note)
    Instance.objects.filter(pk=instance.pk).update(status_message=note)  # shown while it starts
    return note


def _take_free_port(instance: Instance, backend: BaseBackend, take: Callable[[int], None]) -> None:
    """Call take(port) (in its own transaction) for the lowest free port until one write succeeds.

    If a concurrent create or move took the same port first, the write fails on the unique
    constraint and the next port is tried.
    """
    first, last = settings.STOCKROOM_PORT_RANGE
    # An instance of a backend that gives it more than one port (`ports_per_instance`) holds the
    # port it is given and the ones after it: none of them may be another's. Such a backend's
    # instances are given every n-th port of the range, so that two asking at once ask for the same
    # one (the unique constraint decides), and one made before (or another range) is stepped over.
    held: set[int] = set()
    for port, alias in Instance.objects.live().filter(host=instance.host).values_list("port", "backend"):
        if port is not None:
            held.update(range(port, port + _width(alias)))
    width = backend.ports_per_instance
    for port in range(first, last + 2 - width, width):
        wanted = range(port, port + width)
        if held.intersection(wanted) or not all(backend.port_is_free(each) for each in wanted):
            continue
        try:
            with transaction.atomic():
                take(port)
            return
        except IntegrityError:
            if not Instance.objects.live().filter(host=instance.host, port=port).exists():
                raise  # not a port clash: let the caller see it
            held.update(wanted)
    raise NoFreePort(f"No free port is left in {first}-{last}; ask an operator to widen STOCKROOM_PORT_RANGE.")


def _width(alias: str) -> int:
    """How many ports an instance of backend `alias` holds (1 for an alias no longer configured)."""
    if alias not in settings.STOCKROOM_BACKENDS:
        return 1
    return get_backend(alias).ports_per_instance
