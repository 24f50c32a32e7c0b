"""The engine registry. STOCKROOM_ENGINES names each kind's Engine class by dotted path, in the
order pages list them; everything that differs between kinds is asked of the engine."""

from functools import cache

from django.conf import settings
from django.utils.module_loading import import_string

from .base import (
    ArchivedLog,
    Beside,
    Container,
    Endpoint,
    Engine,
    Host,
    Layout,
    LocalSetup,
    LogArchive,
    OptionErrors,
    Replay,
    Scratch,
    ca_of,
)


class UnknownKind(LookupError):
    """No engine of that kind is registered."""


def engines() -> dict[str, Engine]:
    """Every registered engine by kind, in STOCKROOM_ENGINES order."""
    return _load(tuple(settings.STOCKROOM_ENGINES))


@cache
def _load(paths: tuple[str, ...]) -> dict[str, Engine]:
    loaded = [import_string(path)() for path in paths]
    return {engine.kind: engine for engine in loaded}


def get_engine(kind: str) -> Engine:
    try:
        return engines()[kind]
    except KeyError:
        raise UnknownKind(f"No engine of kind {kind!r}; registered: {', '.join(engines())}.") from None


__all__ = [
    "ArchivedLog",
    "LogArchive",
    "Replay",
    "Scratch",
    "Beside",
    "Container",
    "Endpoint",
    "Engine",
    "Host",
    "Layout",
    "LocalSetup",
    "OptionErrors",
    "UnknownKind",
    "engines",
    "ca_of",
    "get_engine",
]
