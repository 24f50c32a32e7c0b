from django import template

from ..engines import UnknownKind, get_engine
from ..options import describe_size

register = template.Library()


@register.filter
def engine_label(kind: str) -> str:
    """The label of the kind's engine, for people; the kind itself if no engine is registered for it."""
    try:
        return get_engine(kind).label
    except UnknownKind:
        return kind


@register.filter
def size(value: int) -> str:
    """A size in bytes, for people: "80 MiB", "1.0 GiB"."""
    return describe_size(value)
