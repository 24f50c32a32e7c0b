"""Durations as people write them: "90" (days), "12h", "30d", "2w", or "never".

No Django in here: settings use it while they load (STOCKROOM_TOKEN_TTL), and so do the token
service, the API and the token page, which all accept the same words.
"""

import re
from datetime import timedelta

NEVER = "never"
UNITS = {"s": timedelta(seconds=1), "m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1),
         "w": timedelta(weeks=1)}  # fmt: skip
# Far enough for any token, near enough that "now + it" stays a date.
LONGEST = timedelta(days=3650)
RULE = "a number of days (90), a duration such as 12h, 30d or 2w (units s, m, h, d, w), or never"
_PATTERN = re.compile(r"(\d{1,7})\s*([smhdw]?)")


def parse_duration(value: object) -> timedelta | None:
    """The duration `value` names; None for "never". ValueError, saying what is allowed, for anything else.

    A bare number counts days. Zero and anything longer than LONGEST are refused.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"Expected {RULE}.")
    text = str(value).strip().lower()
    if text == NEVER:
        return None
    match = _PATTERN.fullmatch(text)
    if not match:
        raise ValueError(f"{str(value)[:40]!r} is not {RULE}.")
    duration = int(match[1]) * UNITS[match[2] or "d"]
    if not timedelta(0) < duration <= LONGEST:
        raise ValueError(f"{str(value)[:40]!r} is out of range: from 1s to {LONGEST.days} days, or never.")
    return duration


def describe_duration(duration: timedelta | None) -> str:
    """The shortest way to write `duration` that parse_duration reads back: "90d", "12h", "never"."""
    if duration is None:
        return NEVER
    seconds = int(duration.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = int(UNITS[unit].total_seconds())
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
