"""How the worker side words a failure for the owner, and cleans up after one."""

import logging

from ..backends.base import BackendError, BaseBackend
from ..models import Instance

logger = logging.getLogger(__name__)


def describe(what: str, instance: Instance, exc: Exception) -> str:
    """A message for the owner: a backend's own words, or a pointer to the worker log."""
    if isinstance(exc, BackendError):
        return f"{what}: {exc}"
    logger.exception("%s for instance %s", what, instance.pk)
    return f"{what}: unexpected {type(exc).__name__}; an operator can find details in the worker log."


def with_note(message: str, note: str) -> str:
    """`message`, followed by `note` (a sentence such as "Port … was taken …; moved to …") if any."""
    return f"{message} {note}" if note else message


def stop_quietly(instance: Instance, backend: BaseBackend) -> str:
    """Stop what may be running; returns "" or a sentence saying that it could not."""
    try:
        backend.stop(instance)
    except Exception as exc:  # the caller's status message says what matters
        logger.exception("Could not stop instance %s", instance.pk)
        return f" Stopping what was left also failed ({exc}); an operator should check the host."
    return ""
