"""An instance's lifetime as its owner words it: when it expires, whether it is protected, and after
how long without a client it is stopped.

`clean` reads the owner's words (the create, extend and PATCH bodies all use them) into the model's
fields. services/expiry.py writes them and acts on them for the reconciler.
"""

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.dateparse import parse_datetime

from ..durations import LONGEST, NEVER, UNITS, describe_duration

FIELDS = ("expires_in", "expires_at", "protected", "stop_when_idle")
EXPIRY_FIELDS = ("expires_in", "expires_at")
EXPIRY_CHANGED = "instance.expiry_changed"  # the event (and webhook) type of a new expiry
PROTECTION_CHANGED = "instance.protection_changed"
IDLE_CHANGED = "instance.idle_stop_changed"

IDLE_SHORTEST = timedelta(seconds=60)  # shorter, and a client between two queries looks idle
IDLE_LONGEST = timedelta(days=30)
# A unit is required: "30" could mean seconds (stop_when_idle's own unit) or days (a token's).
_DURATION = re.compile(r"(\d{1,7})\s*([smhdw])")
EXPIRES_IN_RULE = 'a duration such as "90s", "30m", "2h", "7d" or "2w", or null (or "never") for never'
EXPIRES_AT_RULE = 'a time in the future in ISO 8601, such as "2030-01-31T18:00:00Z", or null for never'
STOP_WHEN_IDLE_RULE = (
    f'a duration from {describe_duration(IDLE_SHORTEST)} to {describe_duration(IDLE_LONGEST)} such as "30m" or '
    '"2h", a whole number of seconds, or null (or "never") for never'
)


def _duration(value: Any, rule: str, *, seconds: bool = False) -> timedelta | None:
    """`value` as a duration (None for null or "never"); ValueError saying `rule` otherwise."""
    if value is None:
        return None
    if seconds and isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{value} is not {rule}.")
        return timedelta(seconds=value)
    if not isinstance(value, str):
        raise ValueError(f"Expected {rule}.")
    text = value.strip().lower()
    if text == NEVER:
        return None
    match = _DURATION.fullmatch(text)
    if not match:
        raise ValueError(f"{value[:40]!r} is not {rule}.")
    duration = int(match[1]) * UNITS[match[2]]
    if not duration:
        raise ValueError(f"{value[:40]!r} is no time at all; give {rule}.")
    return duration


def _moment(value: Any, *, now: datetime) -> datetime | None:
    """`value` as an aware time after `now` (None for null); ValueError otherwise."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment: datetime | None = value
    elif isinstance(value, str):
        try:
            moment = parse_datetime(value.strip())
        except ValueError:  # well formed, but no such day
            moment = None
    else:
        raise ValueError(f"Expected {EXPIRES_AT_RULE}.")
    if moment is None:
        raise ValueError(f"{str(value)[:40]!r} is not {EXPIRES_AT_RULE}.")
    if moment.tzinfo is None:  # a time without a zone is UTC, as everywhere in the API
        moment = moment.replace(tzinfo=UTC)
    if moment <= now:
        raise ValueError(f"{moment:%Y-%m-%d %H:%M:%S} UTC is not in the future; give {EXPIRES_AT_RULE}.")
    if moment - now > LONGEST:
        raise ValueError(f"That is more than {LONGEST.days} days away; give a nearer time, or null for never.")
    return moment


def clean(data: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    """The Instance fields to set for the keys of FIELDS present in `data` (others are ignored).

    - `expires_in` (a duration from `now`) or `expires_at` (a time), not both (unless both are null): `expires_at`
      (None: never) and `expiry_warned_at` reset to None, so that a new expiry is warned of again;
    - `protected`: a boolean (null: False);
    - `stop_when_idle`: a duration, or whole seconds (None: never), and `idle_since` reset to None.

    Raises ValidationError naming each field that is wrong and the forms it takes.
    """
    errors: dict[str, str] = {}
    changes: dict[str, Any] = {}
    if "expires_in" in data and "expires_at" in data and (data["expires_in"], data["expires_at"]) != (None, None):
        errors["expires_at"] = "Give either expires_in or expires_at, not both."
    elif "expires_in" in data:
        try:
            lifetime = _duration(data["expires_in"], EXPIRES_IN_RULE)
        except ValueError as exc:
            errors["expires_in"] = str(exc)
        else:
            if lifetime is not None and lifetime > LONGEST:
                errors["expires_in"] = f"It may be at most {LONGEST.days} days; give {EXPIRES_IN_RULE}."
            else:
                changes.update(expires_at=None if lifetime is None else now + lifetime, expiry_warned_at=None)
    elif "expires_at" in data:
        try:
            changes.update(expires_at=_moment(data["expires_at"], now=now), expiry_warned_at=None)
        except ValueError as exc:
            errors["expires_at"] = str(exc)
    if "protected" in data:
        protected = data["protected"]
        if protected is None or isinstance(protected, bool):
            changes["protected"] = bool(protected)
        else:
            errors["protected"] = "Expected true or false (null: false)."
    if "stop_when_idle" in data:
        try:
            idle = _duration(data["stop_when_idle"], STOP_WHEN_IDLE_RULE, seconds=True)
        except ValueError as exc:
            errors["stop_when_idle"] = str(exc)
        else:
            if idle is not None and not IDLE_SHORTEST <= idle <= IDLE_LONGEST:
                errors["stop_when_idle"] = f"{describe_duration(idle)} is out of range; give {STOP_WHEN_IDLE_RULE}."
            else:
                changes.update(stop_when_idle=None if idle is None else int(idle.total_seconds()), idle_since=None)
    if errors:
        raise ValidationError(errors)
    return changes


def for_create(data: dict[str, Any], *, now: datetime) -> dict[str, Any]:
    """clean() for a new instance: one made without expires_in or expires_at expires
    STOCKROOM_DEFAULT_TTL after `now` (empty: never)."""
    changes = clean(data, now=now)
    if not any(key in data for key in EXPIRY_FIELDS):
        ttl: timedelta | None = settings.STOCKROOM_DEFAULT_TTL
        changes.update(expires_at=None if ttl is None else now + ttl, expiry_warned_at=None)
    return changes


def describe(changes: dict[str, Any]) -> list[tuple[str, str]]:
    """Each change clean() made, as (event type, a sentence for the history)."""
    said: list[tuple[str, str]] = []
    if "expires_at" in changes:
        expires_at = changes["expires_at"]
        when = "never expires" if expires_at is None else f"expires at {expires_at:%Y-%m-%d %H:%M:%S} UTC"
        said.append((EXPIRY_CHANGED, f"It now {when}"))
    if "protected" in changes:
        protected = "Protected: neither expiry nor a delete removes it until it is cleared"
        said.append((PROTECTION_CHANGED, protected if changes["protected"] else "No longer protected"))
    if "stop_when_idle" in changes:
        idle = changes["stop_when_idle"]
        after = "" if idle is None else describe_duration(timedelta(seconds=idle))
        what = f"stopped after {after} without a client connection" if after else "never stopped for want of clients"
        said.append((IDLE_CHANGED, f"It is now {what}"))
    return said


def spoken(span: timedelta) -> str:
    """`span` as people say it, rounded: "45 s", "30 min", "3 h", "2 days"."""
    seconds = max(round(span.total_seconds()), 0)
    if seconds >= 2 * 86400:
        return f"{round(seconds / 86400)} days"
    if seconds >= 2 * 3600:
        return f"{round(seconds / 3600)} h"
    if seconds >= 120:
        return f"{round(seconds / 60)} min"
    return f"{seconds} s"
