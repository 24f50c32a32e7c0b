"""Option definitions: the one place that knows each engine's settings.

An `Option` carries its name, label, help text, default and limits. The API serializer,
the config templates and the README table are all built from these lists.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_SIZE = re.compile(r"\s*(\d{1,15})\s*(b|k|kb|m|mb|g|gb)?\s*", re.IGNORECASE)
# The unit rules of the servers' own config files: "k" is 1000, "kb" is 1024.
_UNITS = {"b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}
MiB = 1024**2
GiB = 1024**3


class OptionError(ValueError):
    """A value that an option does not accept; the message says what is allowed."""


def parse_size(value: Any) -> int:
    """Bytes from an integer or a size string such as "256mb", in config-file units."""
    if isinstance(value, bool):
        raise OptionError("Expected bytes as an integer or a size such as '256mb'.")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (match := _SIZE.fullmatch(value)):
        number, unit = match.groups()
        return int(number) * _UNITS[(unit or "b").lower()]
    raise OptionError("Expected bytes as an integer or a size such as '256mb' (units: b, kb, mb, gb).")


def format_size(value: int) -> str:
    """The exact size in the form options accept: "256mb", or bytes."""
    for unit in ("gb", "mb", "kb"):
        if value and value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)


def describe_size(value: int) -> str:
    """A size for people, rounded: "80 MiB", "11.9 GiB"."""
    if value >= GiB:
        return f"{value / GiB:.1f} GiB"
    if value >= MiB:
        return f"{value / MiB:.0f} MiB"
    return f"{value} bytes"


# How a change to an option after create takes effect (`Option.apply`), as RDS's ApplyMethod and
# Trove's restart_required say it.
LIVE = "live"  # applied to the running server at once, then read back
RESTART = "restart"  # pending until the next restart
CREATE_ONLY = "create-only"  # fixed when the instance is made
# What each means to a user, after an option's help (the API schema, the create page).
APPLY_TEXT = {
    LIVE: "A change after create is applied to the running server at once.",
    RESTART: "A change after create waits for the next restart (pending_options).",
    CREATE_ONLY: "Set only when the instance is made; a change is refused.",
}
APPLY_MODES = (LIVE, RESTART, CREATE_ONLY)


@dataclass(frozen=True)
class Option:
    """One user-settable option of an engine.

    `kind` is "choice" (one of `choices`), "set" (a comma-separated list of some of `choices`,
    maybe none), "text" (a string that `check` accepts: it returns the canonical form or raises
    OptionError), "int" (an integer within `min_value`..`max_value`), "number" (an integer or a
    decimal, same limits) or "size" (bytes, also accepted as "256mb"; same limits).

    `apply` says how a change after create takes effect: LIVE, RESTART or CREATE_ONLY.
    """

    name: str
    label: str
    help_text: str
    kind: str
    default: Any = None
    choices: tuple[str, ...] = field(default_factory=tuple)
    min_value: int | None = None
    max_value: int | None = None
    apply: str = RESTART
    check: Callable[[str], str] | None = None
    allowed: str = ""  # "text": what `check` accepts, for people

    def __post_init__(self) -> None:
        if self.apply not in APPLY_MODES:
            raise TypeError(f"Option {self.name!r}: apply must be one of {', '.join(APPLY_MODES)}.")

    def clean(self, value: Any) -> Any:
        """Return the canonical value, or raise OptionError naming what is allowed."""
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise OptionError(f"{value!r} is not allowed; choose one of: {', '.join(self.choices)}.")
            return value
        if self.kind == "set":
            return self._subset(value)
        if self.kind == "text":
            if not isinstance(value, str) or len(value) > 200:
                raise OptionError(f"Expected a string: {self.allowed}.")
            assert self.check is not None, f"Option {self.name!r} of kind text needs a check."
            return self.check(value)
        if self.kind == "number":
            return self._decimal(value)
        number = parse_size(value) if self.kind == "size" else self._integer(value)
        low, high = self.limits
        if not low <= number <= high:
            raise OptionError(f"{value!r} is out of range; allowed: {self.describe_range()}.")
        return number

    @property
    def limits(self) -> tuple[int, int]:
        """The allowed range of an int or size option."""
        if self.min_value is None or self.max_value is None:
            raise TypeError(f"Option {self.name!r} of kind {self.kind!r} needs min_value and max_value.")
        return self.min_value, self.max_value

    def describe_range(self) -> str:
        show = format_size if self.kind == "size" else str
        low, high = self.limits
        return f"{show(low)} to {show(high)}"

    def describe_allowed(self) -> str:
        if self.kind == "choice":
            return ", ".join(self.choices)
        if self.kind == "set":
            return f"a comma-separated list of any of: {', '.join(self.choices)}"
        if self.kind == "text":
            return self.allowed
        return self.describe_range()

    def _subset(self, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionError(f"Expected a comma-separated string of any of: {', '.join(self.choices)}.")
        chosen: list[str] = []
        for part in (item.strip().upper() for item in value.split(",")):
            if not part:
                continue
            if part not in self.choices:
                raise OptionError(f"{part!r} is not allowed; any of: {', '.join(self.choices)}.")
            if part not in chosen:
                chosen.append(part)
        return ",".join(chosen)

    def _decimal(self, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:  # NaN
            raise OptionError(f"{value!r} is not a number.")
        low, high = self.limits
        if not low <= value <= high:
            raise OptionError(f"{value!r} is out of range; allowed: {self.describe_range()}.")
        return value

    @staticmethod
    def _integer(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionError(f"{value!r} is not an integer.")
        return value


def disk_option(*, min_value: int, help_text: str = "") -> Option:
    """The `disk` option every engine offers: the most its data, logs and temporary files may take.

    The backend enforces it (the local backend with a filesystem of that size per instance);
    engines choose the least a server can start with.
    """
    return Option(
        "disk",
        "Disk space",
        "Bytes for data, logs and temporary files, or a size such as '10gb' (units: b, kb, mb, gb); "
        "writes beyond it fail." + (f" {help_text}" if help_text else ""),
        kind="size",
        default=1 * GiB,
        min_value=min_value,
        max_value=64 * GiB,
        apply=CREATE_ONLY,  # a filesystem of its own on the local backend, made with the instance
    )


def backup_options() -> tuple[Option, Option]:
    """The scheduled backups every engine offers: snapshots the reconciler takes of a running
    instance every so many hours, of which the newest few are kept."""
    return (
        Option(
            "backup_interval_hours",
            "Backup interval",
            "Hours between scheduled snapshots of a running instance; 0 turns them off.",
            kind="int",
            default=24,
            min_value=0,
            max_value=24 * 30,
            apply=LIVE,  # the portal's own schedule: nothing to tell the server
        ),
        Option(
            "backup_retention",
            "Backups kept",
            "How many automatic snapshots (scheduled, and those restores take) are kept; older ones are removed.",
            kind="int",
            default=7,
            min_value=1,
            max_value=100,
            apply=LIVE,
        ),
    )


TLS_OFF = "off"


def tls_option(*choices: str, help_text: str) -> Option:
    """The `tls` option: whether the server serves TLS with a certificate of the portal's CA, and
    whether it refuses plaintext clients. The server takes it when it starts."""
    return Option(
        "tls",
        "TLS",
        help_text,
        kind="choice",
        default=TLS_OFF,
        choices=(TLS_OFF, *choices),
        apply=RESTART,  # the server reads its certificate and listeners when it starts
    )
