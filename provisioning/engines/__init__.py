from .base import Engine, Layout, OptionErrors
from .mysql import MySQL
from .redis import Redis

ENGINES: dict[str, Engine] = {engine.kind: engine for engine in (MySQL(), Redis())}


def get_engine(kind: str) -> Engine:
    return ENGINES[kind]


__all__ = ["ENGINES", "Engine", "Layout", "OptionErrors", "get_engine"]
