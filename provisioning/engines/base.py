"""What differs between MySQL and Redis, whatever backend runs them."""

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from django.template.loader import render_to_string

from ..options import Option, OptionError


@dataclass(frozen=True)
class Layout:
    """Where a server finds its files, as the server sees them, and the address it listens on.

    The local backend puts everything under one folder (`Layout.under`); the Docker backend
    uses the paths the official images expect.
    """

    bind_address: str
    port: int
    data: PurePath
    log: PurePath | str  # "" sends the log to standard output
    pid: PurePath
    socket: PurePath
    files: PurePath  # the only folder a MySQL server may read or write files in
    tmp: PurePath  # the server's temporary files, apart from every other server's
    acl: PurePath

    @classmethod
    def under(cls, root: PurePath, *, bind_address: str, port: int) -> "Layout":
        return cls(
            bind_address=bind_address,
            port=port,
            data=root / "data",
            log=root / "server.log",
            pid=root / "server.pid",
            socket=root / "server.sock",
            files=root / "files",
            tmp=root / "tmp",
            acl=root / "users.acl",
        )


class Engine:
    """One database engine: its options, its config file and how to log in to it.

    Subclasses set `kind`, `options`, `config_template` and `config_name`, and implement
    `check_login` and `connection`.
    """

    kind: str  # in URLs and the database: lower-case letters and digits
    label: str  # for people: "MySQL"
    options: tuple[Option, ...]
    config_template: str
    config_name: str
    # What connection() returns: field name -> int or str; the API's config schema is built from it.
    connection_fields: dict[str, type]

    def clean_options(self, data: dict[str, Any]) -> dict[str, Any]:
        """Validated options with defaults filled in.

        Raises OptionErrors collected as {field: message}; unknown fields are errors too.
        """
        known = {option.name: option for option in self.options}
        errors: dict[str, str] = {
            name: f"Unknown option; allowed options: {', '.join(known)}." for name in data if name not in known
        }
        cleaned: dict[str, Any] = {}
        for option in self.options:
            value = data.get(option.name)
            if value is None:
                cleaned[option.name] = option.default
                continue
            try:
                cleaned[option.name] = option.clean(value)
            except OptionError as exc:
                errors[option.name] = str(exc)
        if not errors:
            errors = self.check_together(cleaned)
        if errors:
            raise OptionErrors(errors)
        return cleaned

    def check_together(self, options: dict[str, Any]) -> dict[str, str]:
        """Rules that involve several options; may fill in dependent defaults."""
        return {}

    def render_config(self, instance, layout: Layout) -> str:
        return render_to_string(
            self.config_template, {"instance": instance, "options": instance.options, "layout": layout}
        )

    def memory_limit(self, options: dict[str, Any]) -> int:
        """Bytes a container running this engine with these options may use."""
        raise NotImplementedError("Engines must say how much memory a server needs.")

    def check_login(self, instance, *, host: str, port: int, timeout: float) -> None:
        """Log in with the user's credentials and run a trivial command; raise on failure."""
        raise NotImplementedError("Engines must say how a user logs in.")

    def connection(self, instance) -> dict[str, Any]:
        """What a user needs to connect: host, port, credentials, options and a URI.

        The keys are exactly those of `connection_fields`.
        """
        raise NotImplementedError("Engines must describe their connection details.")

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        """Ready-to-paste ways to connect, as (label, text), from `connection()`'s answer."""
        return [("URI", connection["uri"])]


class OptionErrors(Exception):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))
        self.errors = errors
