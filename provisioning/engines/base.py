"""The contract every engine keeps: what a kind of database *is*, whatever backend runs it.

An engine owns every fact about its kind: options and the config file, accounts and how a user
connects, how a server is started on the host (`local_setup`, `local_argv`) or in a container
(`container`), how the portal sets a password and how it proves a login works. Backends, the API,
pages and admin ask the engine and never branch on the kind. Adding a kind means one folder under
`provisioning/engines/` and one line in STOCKROOM_ENGINES.
"""

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path, PurePath, PurePosixPath
from subprocess import CompletedProcess
from typing import IO, TYPE_CHECKING, Any, Protocol

from django.template import Context
from django.template import Engine as TemplateEngine

from ..errors import BackendError, ImportRefused
from ..options import TLS_OFF, Option, OptionError

if TYPE_CHECKING:
    from ..models import Instance


@dataclass(frozen=True)
class Layout:
    """Where a server finds its files, as the server sees them, and the address it listens on.

    The local backend lays out each instance with `Layout.under`; in a container the engine says
    where its image expects them (`Engine.container_layout`).
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
    # The folder of the files the portal writes (config, ACL, init file): the server reads them and
    # cannot change them. None in a container, where each such file is mounted on its own.
    config: PurePath | None = None
    # The address the portal administers the server from over TCP, where it cannot reach its Unix
    # socket (a server on another host): the engine gives its administrative account that address
    # alone, over TLS alone (`Engine.portal_port`), and keeps on its own disk what the portal changes
    # in it (`set_password`'s `write` is None). The server then serves TLS whatever its `tls` option.
    admin_from: str | None = None

    @classmethod
    def under(cls, config: PurePath, writable: PurePath, *, bind_address: str, port: int) -> "Layout":
        """The portal's files in `config`; everything the server writes (data, log, pid, socket,
        temporary files) in `writable`."""
        return cls(
            bind_address=bind_address,
            port=port,
            data=writable / "data",
            log=writable / "server.log",
            pid=writable / "server.pid",
            socket=writable / "server.sock",
            files=writable / "files",
            tmp=writable / "tmp",
            acl=config / "users.acl",
            config=config,
        )


@dataclass(frozen=True)
class Endpoint:
    """Where the portal reaches a running server, for its own logins and administration.

    With `socket` set, clients connect there and ignore `host` and `port`: the Unix socket in the
    instance's own folder, which nobody else can put a listener in. Without it, TCP `host`:`port`,
    which the backend has checked is the instance's own listener (`BaseBackend.login_endpoint`).
    """

    host: str
    port: int
    socket: str | None = None
    # Over TCP: the CA's PEM the server's certificate is checked against (the instance serves TLS).
    tls_ca: str | None = None


# Writes one of the instance's files (by its name, e.g. "users.acl") where the server reads it.
# None where the backend cannot (a server on another host): the server keeps the change itself.
WriteFile = Callable[[str, str], None] | None


class Host(Protocol):
    """What the local backend lends an engine to lay out a new instance on this host.

    `mkdir`, `write` and `run` are for building shared things in `cache`: they act as a user that
    no instance's server runs as. The backend itself makes an instance's own files and folders
    (`LocalSetup`), as that instance's user.
    """

    def program(self, name: str) -> Path:
        """The path of a server program (e.g. "redis-server"), as configured or found on PATH."""
        ...

    def mkdir(self, path: Path) -> None: ...

    def write(self, path: Path, text: str) -> None: ...

    def run(self, argv: Sequence[str | Path], *, cwd: Path) -> CompletedProcess[str]:
        """Run a program as the instances' user; output is captured as text."""
        ...

    @property
    def cache(self) -> Path:
        """A folder for things built once and shared by instances (e.g. a data-directory template)."""
        ...


class Beside(Protocol):
    """What a backend lends an engine to snapshot or restore one instance (`Engine.snapshot`,
    `Engine.restore`): programs run beside its server with the server's rights only, and the
    portal's own way in.

    Programs run as the server's uid (local) or in its container (Docker), so they can read and
    write only what the server itself can, and root never follows a path the tenant controls.
    """

    @property
    def layout(self) -> Layout:
        """Where programs run by `run` find the server's files."""
        ...

    @property
    def admin(self) -> Endpoint:
        """Where the portal's own clients reach the running server (its Unix socket)."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        """Run `argv` beside the server; raise BackendError (with the end of its error output) if it
        fails. `stdin` is copied to its standard input, its standard output to `stdout`. Given a
        `secret` (an option file's text, say), `{secret}` in `argv` is replaced by a path where the
        program, and nobody else, may read it; it is never written to a disk.
        """
        ...


class Scratch(Protocol):
    """A throwaway folder of the portal's, and programs run there without privileges, as a uid of
    its own that no instance and no shared template has: where a snapshot, which may hold anything
    its tenant put there, is unpacked, loaded into a throwaway server, checked or exported. It is
    emptied, and whatever runs as its uid ended, when the work is done."""

    @property
    def folder(self) -> PurePath:
        """An empty folder that programs run by `run` may write in, and nobody else."""
        ...

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        """As `Beside.run`, in `folder`."""
        ...


class LogArchive(Protocol):
    """Where an engine puts the closed log files of one instance's timeline (binary logs, the
    incremental files of an append-only file): off the instance's disk, in the snapshots storage.
    """

    def names(self) -> set[str]:
        """The names of the files already archived."""
        ...

    def save(self, name: str, fill: Callable[[IO[bytes]], None]) -> None:
        """Keep as `name` what fill(out) writes to `out`: a closed log file, as the server wrote it."""
        ...

    def covered(self, until: datetime) -> None:
        """Every write the server made before `until` is now in an archived file."""
        ...


@dataclass(frozen=True)
class ArchivedLog:
    """One archived log file, as a restore reads it."""

    name: str
    # No write in it is older than this whole second; None: unknown, so it may hold any.
    opened_at: datetime | None
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class Replay:
    """What a point-in-time restore replays on top of its base snapshot."""

    start: str  # where the log after the base begins, as the engine's `snapshot` returned it
    until: datetime  # a whole second (UTC): every write before it, and none at or after it
    logs: Sequence[ArchivedLog]  # the archive of the base's timeline, in the order it was archived


class TooLarge(BackendError):
    """A copy passed the most it may take."""


class Bounded:
    """A file that takes at most `limit` bytes; a write past it raises TooLarge (which stops the
    helper program that writes through it)."""

    def __init__(self, file: IO[bytes], limit: int, why: str):
        self.file, self.left, self.why = file, limit, why

    def write(self, data: bytes) -> int:
        self.left -= len(data)
        if self.left < 0:
            raise TooLarge(self.why)
        return self.file.write(data)


SMALL = 64 * 1024  # the most a listing or a note of the server's folder may take


def read_small(beside: "Beside", argv: list[str], what: str) -> str:
    """The output of `argv` (a `read_out` of a note, an `ls`) beside the server, which the uid may
    make as long as it likes: at most SMALL bytes, else BackendError naming `what`."""
    out = io.BytesIO()
    beside.run(argv, stdout=Bounded(out, SMALL, f"{what} is longer than {SMALL} bytes."))  # type: ignore[arg-type]
    return out.getvalue().decode(errors="replace")


def reading(path: PurePath) -> list[str]:
    """The command that writes the file at `path` to its output, as `read_out` says."""
    return ["dd", "iflag=nofollow,nonblock", "bs=1M", "status=none", f"if={path}"]


def read_out(beside: "Beside", path: PurePath) -> Callable[[IO[bytes]], None]:
    """What copies the file at `path`, read beside the server (as its uid), to a given output: how
    an engine hands a file of the server's folder to `LogArchive.save` or a snapshot. The uid may
    have put anything there: it is never read through a symlink (which could lead to a file the uid
    may read but not copy, as its ACL file), nor waited on as a FIFO (it reads as empty)."""

    def copy(out: IO[bytes]) -> None:
        beside.run(reading(path), stdout=out)

    return copy


# Putting a new folder in place of an old one, beside a server (as its uid): the old goes aside, the
# new takes its place, the old is removed. A replacement cut short in between is undone first, so
# the server always finds the whole old folder or the whole new one, never a mix and never none.
_UNDO_CUT_SHORT = 'set -e; if [ ! -e "$1" ] && [ -e "$2" ]; then mv -T -- "$2" "$1"; fi; rm -rf -- "$2"'
_SWAP = 'set -e; if [ -e "$1" ]; then mv -T -- "$1" "$3"; fi; mv -T -- "$2" "$1"; rm -rf -- "$3"'


def replace_folder(beside: "Beside", target: PurePath, fill: Callable[[PurePath], None]) -> None:
    """Make a new folder with fill(staged), where `staged` is an empty folder beside `target`, then
    put it in place of `target`; safe to call again after it was cut short anywhere."""
    staged, old = target.with_name(f"{target.name}.restoring"), target.with_name(f"{target.name}.old")
    beside.run(["sh", "-c", _UNDO_CUT_SHORT, "sh", str(target), str(old)])
    beside.run(["rm", "-rf", "--", str(staged)])
    beside.run(["mkdir", "-m", "0700", "--", str(staged)])
    try:
        fill(staged)
    except Exception:
        beside.run(["rm", "-rf", "--", str(staged)])  # what it held is of no use, and takes room
        raise
    beside.run(["sh", "-c", _SWAP, "sh", str(target), str(staged), str(old)])


@dataclass(frozen=True)
class LocalSetup:
    """What a brand-new local instance needs before its first start."""

    files: dict[str, str]  # name in the instance's folder -> content (local_config's, ACL, init file)
    dirs: tuple[Path, ...] = ()  # folders to make
    seed: Path | None = None  # a data directory to copy in, instead of an empty one
    first_start_args: tuple[str, ...] = ()  # added to local_argv() at the first start only
    remove_after_first_start: tuple[str, ...] = ()  # names in `files` not needed once started


@dataclass(frozen=True)
class Container:
    """How a container runs the server, in the image contract the engine targets.

    No secret goes in `command` or `environment`: `docker inspect` shows them to anyone who may use
    Docker, for as long as the container exists.
    """

    files: dict[str, tuple[PurePosixPath, str]]  # name -> (path in the container, content); mounted read-only
    command: list[str] | None = None  # None: the image's own
    environment: dict[str, str] = field(default_factory=dict)
    # Files the image reads when it makes its data, from the folder `init_dir` (mounted read-only):
    # name -> content. Once the server answers they are emptied, not removed, as an image may
    # require that a file named in its environment still exists at every start.
    init_dir: PurePosixPath | None = None
    init_files: dict[str, str] = field(default_factory=dict)


class Engine:
    """One kind of database. Subclasses set the class attributes and implement the methods that
    raise NotImplementedError; the rest have defaults that fit most kinds.
    """

    kind: str  # in URLs and the database: lower-case letters and digits
    label: str  # for people: "MySQL"
    options: tuple[Option, ...]
    config_template: str  # a Django template in the engine's folder, rendered with instance, options, layout
    config_name: str  # the rendered file's name in the instance's folder
    # What connection() returns: field name -> int or str; the API's config schema is built from it.
    connection_fields: dict[str, type]
    # The accounts a new instance gets: the user's database (if the kind has databases) and user name.
    database: str = ""
    username: str
    # Programs the local backend must find to run this kind.
    local_programs: tuple[str, ...] = ()
    # The default image of the Docker backend, and the port the server listens on inside it.
    image: str
    container_port: int
    # Tasks (processes and threads) a server may have at once: the kernel's limit for its cgroup or container.
    pids_limit: int = 256

    # Options ---------------------------------------------------------------------------

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

    def with_defaults(self, options: dict[str, Any]) -> dict[str, Any]:
        """`options` as stored, with the default of every option it lacks: an instance made before
        an option existed runs with that option's default."""
        return {**{option.name: option.default for option in self.options}, **options}

    def option(self, name: str) -> Option:
        """The option called `name`; KeyError if the engine has none."""
        return {option.name: option for option in self.options}[name]

    def memory_reservation(self, options: dict[str, Any]) -> int:
        """Bytes a server with these options is expected to use: idle, with its buffers, caches
        and data (e.g. Redis's maxmemory) full. Never more than memory_limit(options).

        The portal admits a create or start only while the reservations of running instances fit
        STOCKROOM_MEMORY_BUDGET and the owner's STOCKROOM_MEMORY_QUOTA, so it is a promise that
        several servers can keep at once, not a worst case.
        """
        raise NotImplementedError("Engines must say how much memory a server is expected to use.")

    def memory_limit(self, options: dict[str, Any]) -> int:
        """Bytes a server with these options may use at most: the kernel's limit (a cgroup, a
        container's memory limit), past which it is killed. Limits may add up to more than the
        host has (overcommit); reservations may not.
        """
        raise NotImplementedError("Engines must say how much memory a server may use.")

    # Files -----------------------------------------------------------------------------

    @cached_property
    def _templates(self) -> TemplateEngine:
        import inspect

        folder = Path(inspect.getfile(type(self))).parent
        return TemplateEngine(dirs=[str(folder)], autoescape=False)

    def render(self, template: str, **context: Any) -> str:
        """Render one of the engine's own templates (kept in its folder)."""
        return self._templates.get_template(template).render(Context(context))

    def render_config(self, instance: "Instance", layout: Layout) -> str:
        """The config file. Where the server serves TLS (`serves_tls`), `tls` in its context names
        the files `tls_files` writes; where the portal logs in across a network, `portal_port` is
        where it does, over TLS."""
        options = self.with_defaults(instance.options)
        tls = self.tls_paths(layout) if self.serves_tls(instance, layout) else None
        portal_port = self.portal_port(instance, layout) if layout.admin_from is not None else None
        return self.render(
            self.config_template, instance=instance, options=options, layout=layout, tls=tls, portal_port=portal_port
        )

    # TLS -------------------------------------------------------------------------------
    #
    # An instance with `tls` on has a certificate of the portal's CA for its public host
    # (services/certificates.py). Its server reads it, its key and the CA's certificate from three
    # files among the instance's own files, which only its uid may read. They are always written,
    # empty with `tls` off, so that a container's mounts stay the same whatever the option says.

    # Where a container finds the TLS files (each mounted read-only); locally, the config folder.
    tls_container_dir: PurePosixPath = PurePosixPath("/etc/stockroom")

    def tls(self, instance: "Instance") -> str:
        """The instance's `tls` mode as its server runs it ("off" for a kind without the option)."""
        return str(instance.options.get("tls", TLS_OFF))

    def serves_tls(self, instance: "Instance", layout: Layout | None = None) -> bool:
        """Whether the server serves TLS: its `tls` option is on, or the portal administers it
        across a network (`Layout.admin_from`), where its logins go over TLS alone."""
        return self.tls(instance) != TLS_OFF or (layout is not None and layout.admin_from is not None)

    def portal_port(self, instance: "Instance", layout: Layout) -> int:
        """Where the portal logs in over TLS when it administers the server across a network
        (`Layout.admin_from`): by default the users' port, where the server speaks TLS beside
        plaintext."""
        return layout.port

    def tls_paths(self, layout: Layout) -> dict[str, PurePath]:
        """Where the server reads its certificate chain, its key and the CA's certificate."""
        folder = layout.config if layout.config is not None else self.tls_container_dir
        return {"cert": folder / TLS_CERT, "key": folder / TLS_KEY, "ca": folder / TLS_CA}

    def tls_files(self, instance: "Instance", layout: Layout | None = None) -> dict[str, str]:
        """Name -> content of the TLS files: empty unless the server serves TLS (`serves_tls`).
        Raises BackendError if it does and the instance has no certificate (the service issues one
        before a start)."""
        if not self.serves_tls(instance, layout):
            return dict.fromkeys((TLS_CERT, TLS_KEY, TLS_CA), "")
        if not instance.tls_certificate or not instance.tls_key:
            raise BackendError("The instance has TLS on but no certificate yet.")
        return {TLS_CERT: instance.tls_certificate, TLS_KEY: instance.tls_key, TLS_CA: ca_of(instance)}

    def tls_container_files(self, instance: "Instance", layout: Layout) -> dict[str, tuple[PurePosixPath, str]]:
        """`tls_files` as `Container.files` entries."""
        files = self.tls_files(instance, layout)
        return {name: (self.tls_container_dir / name, text) for name, text in files.items()}

    def reload_tls(self, instance: "Instance", *, admin: Endpoint) -> bool:
        """Make the running server read its TLS files again (the backend has just written a renewed
        certificate); False if this kind cannot, and takes it at its next start."""
        return False

    # Running a server ------------------------------------------------------------------

    def local_setup(self, instance: "Instance", layout: Layout, host: Host) -> LocalSetup:
        """Files, folders and data a new instance needs on this host before its first start."""
        raise NotImplementedError("Engines must say how a local server is laid out.")

    def local_config(self, instance: "Instance", layout: Layout) -> dict[str, str]:
        """Files the local backend writes again before every start (name in the instance's folder ->
        content), so a server always starts with the instance's current port and options: the
        service moves a stopped instance to another port when a stranger took its own. By default,
        the config file and the TLS files; `local_setup` includes these too.
        """
        return {self.config_name: self.render_config(instance, layout), **self.tls_files(instance)}

    def local_argv(self, host: Host, config: Path) -> list[str]:
        """The command that starts the server in the foreground with the rendered `config`."""
        raise NotImplementedError("Engines must say how a local server is started.")

    def container_layout(self, *, bind_address: str, port: int) -> Layout:
        """Where the engine's image keeps the server's files."""
        raise NotImplementedError("Engines must say where their image keeps its files.")

    def container(self, instance: "Instance", layout: Layout) -> Container:
        """The files, command and environment of a new container for `instance`."""
        raise NotImplementedError("Engines must describe their container.")

    def container_restored(self, instance: "Instance", layout: Layout) -> Container:
        """The container's files (and first-start files) for its first start after `restore`, so its
        accounts and passwords are the instance's own again, whatever the snapshot held. Once a login
        works, the backend writes `container`'s files again and empties the first-start files. By
        default `container`'s: a kind whose accounts live outside its data needs nothing more.
        """
        return self.container(instance, layout)

    # Administration and logins ---------------------------------------------------------

    def set_password(self, instance: "Instance", password: str, *, admin: Endpoint, write: WriteFile) -> None:
        """Give the user `password` on the running server; the old one must stop working, and
        sessions opened with it are ended.

        `admin` is where the portal's own account reaches the server (its Unix socket when it has
        one); `write` replaces one of the instance's files where the server reads it, or is None
        where the backend cannot write them: the server keeps the new password on its own disk.
        """
        raise NotImplementedError("Engines must say how a password is changed.")

    def check_login(self, instance: "Instance", endpoint: Endpoint, *, timeout: float) -> None:
        """Log in at `endpoint` (its Unix socket if set, else TCP) with the user's credentials and
        run a trivial command; raise on failure."""
        raise NotImplementedError("Engines must say how a user logs in.")

    def start_settings(self, options: dict[str, Any]) -> dict[str, Any]:
        """Live options the config file does not carry, which the portal sets (`apply_live`) on each
        start once the server answers: those a server would refuse to start with when its data
        cannot serve them (a named time zone, in data made before the zone tables were loaded)."""
        return {}

    # Live options the running server holds: option name -> the server's name for the setting. A
    # live option not named here is the portal's own (the backup schedule): nothing to tell the server.
    live_settings: dict[str, str] = {}

    def apply_live(self, instance: "Instance", changes: dict[str, Any], *, admin: Endpoint) -> None:
        """Set `changes` (option name -> new value, all in `live_settings`) on the running server as
        the portal's own account, then read each back. If any is refused or reads back otherwise,
        put back every value already changed and raise BackendError naming the option and why."""
        raise NotImplementedError(f"{self.label} options cannot be changed on a running server.")

    def refuse_writes(self, instance: "Instance", refuse: bool, *, admin: Endpoint) -> None:
        """Make the running server refuse every write of the user, reads still working (or, with
        `refuse` False, accept them again): what the local backend does to an instance over its
        disk limit where the kernel cannot stop it. A restarted server accepts writes."""
        raise NotImplementedError("Engines must say how a server refuses writes.")

    # Versions --------------------------------------------------------------------------

    # The server program whose `--version` says which version a server started now would run.
    version_program: str

    def server_version(self, instance: "Instance", admin: Endpoint) -> str:
        """The version the running server reports, as the portal's own account reads it at `admin`:
        what `program_version` reads from its program, so the two can be compared."""
        raise NotImplementedError("Engines must say how a server's version is read.")

    def program_version(self, output: str) -> str:
        """The version a server started from `version_program` would report, read from the output of
        `version_program --version`; BackendError if it says none."""
        raise NotImplementedError("Engines must say how a program's version is read.")

    def upgrade(self, instance: "Instance", beside: Beside) -> str:
        """Bring the data of the running server up to its version, after it started on other
        binaries than the data was last served by; safe to call when there is nothing to do. Returns
        a sentence saying what was done, "" if nothing was; raises BackendError if it failed. By
        default nothing: a kind whose server converts its own data as it starts needs no more."""
        return ""

    def client_connections(self, instance: "Instance", *, admin: Endpoint) -> int:
        """How many connections the tenant's clients hold open on the running server, idle ones
        included; the portal's own (its administrative account, this very query) do not count.
        What stop_when_idle watches."""
        raise NotImplementedError("Engines must say how client connections are counted.")

    # Snapshots -------------------------------------------------------------------------

    # The file name suffix of this kind's snapshots (what `snapshot` writes).
    snapshot_suffix: str = "snapshot"

    # Whether `archive_logs` and `restore(..., replay=…)` work: point-in-time recovery.
    point_in_time: bool = False

    def snapshot(self, instance: "Instance", beside: Beside, out: IO[bytes], archive: LogArchive | None = None) -> str:
        """Write a consistent copy of the running server's data to `out`, while it goes on serving
        reads and writes. The copy holds no password in plain text (hashes, as on the server's own
        disk, may be in it). Raise BackendError if it cannot be made.

        Returns where the log that follows the copy begins (`Replay.start`, in the engine's own
        notation), or "" if the copy cannot be the base of a point-in-time restore.
        A kind whose copy closes a log file puts the closed file in `archive`, if given.
        """
        raise NotImplementedError("Engines must say how a snapshot is taken.")

    def archive_logs(self, instance: "Instance", beside: Beside, archive: LogArchive) -> None:
        """Close the running server's current log file (new writes go to a new one), copy every
        closed file that `archive` lacks into it, then tell it up to when it is `covered`."""
        raise NotImplementedError(f"{self.label} has no point-in-time recovery.")

    def restore(self, instance: "Instance", beside: Beside, snapshot: IO[bytes], replay: Replay | None = None) -> None:
        """Replace the stopped server's data with `snapshot` (what `snapshot` wrote, maybe of
        another instance of this kind), and with `replay`, the logged writes after it up to
        `replay.until`. The backend then starts the server as at its first start
        (`LocalSetup.first_start_args`), so its accounts are the instance's own again, whatever
        the snapshot held. Safe to call again after it was cut short.
        """
        raise NotImplementedError("Engines must say how a snapshot is restored.")

    # Export and verify ----------------------------------------------------------------

    # The portable file a snapshot is exported as: its name's suffix and media type.
    export_suffix: str = "snapshot"
    export_media_type: str = "application/octet-stream"
    # Whether the snapshot's own file is that portable file (the export streams it as it is).
    export_is_snapshot: bool = False

    def export(self, snapshot: IO[bytes], scratch: Scratch, out: IO[bytes], *, database: str) -> None:
        """Write to `out` the portable file (`export_suffix`) of `snapshot` (what `snapshot` wrote),
        made in `scratch`: for a kind with databases, `database`'s. Raise BackendError if the
        snapshot cannot be read. Not called when `export_is_snapshot`."""
        raise NotImplementedError(f"{self.label} snapshots cannot be exported.")

    def verify(self, snapshot: IO[bytes], scratch: Scratch, *, database: str) -> str:
        """Load `snapshot` into a throwaway server in `scratch` and run the kind's own check of its
        data (of `database`, for a kind with databases); return what was found, a short sentence.
        Raise BackendError saying what is wrong if it does not load or the check fails."""
        raise NotImplementedError(f"{self.label} snapshots cannot be verified.")

    # Imports ---------------------------------------------------------------------------

    # The file names an import takes (e.g. ".sql", ".sql.gz"); none: the kind takes no imports.
    import_suffixes: tuple[str, ...] = ()
    # True: a checked file is put in as a snapshot is (`restore`, the server stopped); False: it is
    # loaded into the running server (`load`).
    import_replaces_data: bool = False

    def check_import(self, instance: "Instance", beside: Beside, upload: IO[bytes]) -> None:
        """Read the whole uploaded file and raise ImportRefused, saying why and where, unless it can
        be loaded as the tenant (not cut short, of the kind's format, asking no right the tenant
        lacks). Changes nothing of the server's data."""
        raise ImportRefused(f"{self.label} instances take no imports.")

    def load(self, instance: "Instance", beside: Beside, upload: IO[bytes]) -> None:
        """Load a checked file into the running server with the tenant's own rights (never the
        portal's); raise BackendError, naming where in the file, if the server refuses part of it
        (what came before stays loaded: the caller puts the data back)."""
        raise NotImplementedError(f"{self.label} imports replace the data; they are not loaded.")

    def connection(self, instance: "Instance") -> dict[str, Any]:
        """What a user needs to connect: host, port, credentials, options and a URI.

        The keys are exactly those of `connection_fields`.
        """
        raise NotImplementedError("Engines must describe their connection details.")

    def snippets(self, connection: dict[str, Any]) -> list[tuple[str, str]]:
        """Ready-to-paste ways to connect, as (label, text), from `connection()`'s answer."""
        return [("URI", connection["uri"])]


TLS_CERT, TLS_KEY, TLS_CA = "tls-cert.pem", "tls-key.pem", "tls-ca.pem"
_PEM_END = "-----END CERTIFICATE-----"


def ca_of(instance: "Instance") -> str:
    """The CA certificate (PEM) the instance's certificate was signed with: the last of its chain;
    "" if it has none."""
    chain = [part + _PEM_END + "\n" for part in instance.tls_certificate.split(_PEM_END) if part.strip()]
    return chain[-1].lstrip() if len(chain) > 1 else ""


class OptionErrors(Exception):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(f"{name}: {message}" for name, message in errors.items()))
        self.errors = errors
