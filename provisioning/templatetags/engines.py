from datetime import timedelta

from django import template
from django.utils import timezone

from ..engines import UnknownKind, get_engine
from ..options import describe_size
from ..services.lifetime import spoken

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


@register.filter
def lifetime_badges(instance) -> list[tuple[str, str]]:
    """(class, text) of the badges that say how long the instance lives: "expires in 3 h",
    "stops when idle after 30 min", "protected"."""
    badges = []
    if instance.protected:
        badges.append(("protected", "protected"))
    if instance.expires_at is not None:
        left = instance.expires_at - timezone.now()
        if instance.protected:
            badges.append(("expiry", f"would expire in {spoken(left)}" if left.total_seconds() > 0 else "expired"))
        else:
            badges.append(("expiry", f"expires in {spoken(left)}" if left.total_seconds() > 0 else "expiring now"))
    if instance.stop_when_idle is not None:
        badges.append(("idle", f"stops when idle after {spoken(timedelta(seconds=instance.stop_when_idle))}"))
    return badges
