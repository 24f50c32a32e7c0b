"""The embedded default: one server process per instance, as the engine says to start it.

Each instance owns `STOCKROOM_INSTANCES_DIR/<kind>/<id>/` (by default under DATA_DIR): its
config file, data, log and pid.
Servers are started with `setsid --fork`, so they belong to no portal process and outlive
restarts of the web server and the worker. A process belongs to an instance when its
working directory is inside the instance's directory; that is how `destroy` finds it even
when no pid file was written.
"""

import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from django.conf import settings

from ..engines import Endpoint, Layout, engines, get_engine
from .base import BackendError, BaseBackend

if TYPE_CHECKING:
    from ..models import Instance

logger = logging.getLogger(__name__)

HASHES = re.compile(r"\*[0-9A-Fa-f]{40}|#[0-9a-f]{64}")


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` or below it."""
    found = []
    prefix = str(directory)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cwd = _working_directory(entry)
        if cwd is not None and (cwd == prefix or cwd.startswith(prefix + "/")):
            found.append(int(entry.name))
    return found


def _working_directory(process: Path) -> str | None:
    """A process's working directory; None if it is gone or not ours to read.

    A killed server's main thread may be gone (a zombie, with no working directory) while its
    other threads still hold its files and its listening socket: it is not gone until they are.
    """
    try:
        return os.readlink(process / "cwd")
    except OSError:
        pass
    try:
        if (process / "stat").read_text().rpartition(")")[2].split()[0] != "Z":
            return None  # gone, or not ours to read
        threads = list((process / "task").iterdir())
    except (OSError, IndexError):
        return None
    for thread in threads:
        try:
            return os.readlink(thread / "cwd")
        except OSError:
            continue
    return None


def kill_processes_under(directory: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process working in `directory` and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := processes_under(directory):
        if time.monotonic() > deadline:
            raise BackendError(f"Processes {pids} in {directory} did not exit.")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def stop_processes_under(directory: Path, timeout: float = 30.0) -> None:
    """SIGTERM every process working in `directory` so it can shut down cleanly; SIGKILL stragglers."""
    for pid in processes_under(directory):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while processes_under(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_processes_under(directory)


class LocalBackend(BaseBackend):
    """Runs each instance's server as a process on this host.

    `programs` maps a program name an engine asks for (a server binary) to its path; a program
    not named there is looked up on PATH.

    The portal logs in over the Unix socket in the instance's folder (`login_endpoint`), and
    writes the engine's `local_config` again before every start, so a server starts on whatever
    port the instance holds now (`moves_ports`).
    """

    moves_ports = True

    def __init__(self, alias: str, *, run_as: str, programs: dict[str, str] | None = None):
        super().__init__(alias)
        self.run_as = run_as
        self.programs = dict(programs or {})

    # Paths -----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return Path(settings.STOCKROOM_INSTANCES_DIR)

    @property
    def cache(self) -> Path:
        return self.root / "_templates"

    def directory(self, instance: "Instance") -> Path:
        return self.root / instance.kind / str(instance.pk)

    def layout(self, instance: "Instance") -> Layout:
        assert instance.port is not None
        return Layout.under(self.directory(instance), bind_address=settings.STOCKROOM_BIND_ADDRESS, port=instance.port)

    def program(self, name: str) -> Path:
        path = self.programs.get(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
        if not path or not os.access(path, os.X_OK):
            raise BackendError(f"The program {name} is missing; install the package that provides it.")
        return Path(path)

    # The contract ----------------------------------------------------------------------

    def create(self, instance: "Instance") -> None:
        engine = get_engine(instance.kind)
        directory, layout = self.directory(instance), self.layout(instance)
        self.destroy(instance)  # a clean slate, should the task run a second time
        self.mkdir(directory)
        setup = engine.local_setup(instance, layout, self)
        if setup.seed:
            self._copy_as_owner(setup.seed, Path(layout.data))
        for folder in setup.dirs:
            self.mkdir(folder)
        for name, text in setup.files.items():
            self.write(directory / name, text)
        instance.mark("data_directory")
        self._run_server(instance, extra=setup.first_start_args)
        for name in setup.remove_after_first_start:
            (directory / name).unlink()

    def stop(self, instance: "Instance") -> None:
        stop_processes_under(self.directory(instance))

    def start(self, instance: "Instance") -> None:
        directory = self.directory(instance)
        kill_processes_under(directory)  # whatever is left of a server that hung
        # The port may have changed since the last start (see BaseBackend.moves_ports).
        for name, text in get_engine(instance.kind).local_config(instance, self.layout(instance)).items():
            self.write(directory / name, text)
        self._run_server(instance)

    def set_password(self, instance: "Instance", password: str) -> None:
        directory = self.directory(instance)
        get_engine(instance.kind).set_password(
            instance,
            password,
            admin=self.login_endpoint(instance),
            write=lambda name, text: self.write(directory / name, text),
        )

    def login_endpoint(self, instance: "Instance") -> Endpoint:
        """The server's Unix socket: it is in the instance's folder, where nobody else can listen."""
        layout = self.layout(instance)
        return Endpoint(layout.bind_address, layout.port, socket=str(layout.socket))

    def instance_pids(self, instance: "Instance") -> set[int]:
        return set(processes_under(self.directory(instance)))

    def destroy(self, instance: "Instance") -> None:
        directory = self.directory(instance)
        kill_processes_under(directory)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise BackendError(f"Could not remove {directory}.")

    def check(self) -> str:
        for engine in engines().values():
            for name in engine.local_programs:
                self.program(name)
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise BackendError(f"Cannot write to {self.root}.")
        return "Server programs found; the instances folder is writable."

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        found = {}
        for kind in engines():
            for directory in sorted((self.root / kind).glob("*")):
                if directory.name.isdigit() and int(directory.name) not in known_ids:
                    pids = processes_under(directory)
                    state = f"server running (pid {', '.join(map(str, pids))})" if pids else "no process"
                    found[f"{kind}/{directory.name}"] = f"Folder {directory}; {state}."
        return found

    def remove_orphan(self, key: str) -> None:
        kind, pk = key.split("/")
        directory = self.root / kind / pk
        kill_processes_under(directory)
        shutil.rmtree(directory, ignore_errors=True)

    # Processes -------------------------------------------------------------------------

    def _run_server(self, instance: "Instance", *, extra: Sequence[str] = ()) -> None:
        directory, layout = self.directory(instance), self.layout(instance)
        engine = get_engine(instance.kind)
        argv = [*engine.local_argv(self, directory / engine.config_name), *extra]
        log = Path(layout.log)
        self._spawn(argv, cwd=directory, log=log)
        self._wait_for_login(instance, directory, log)

    def _wait_for_login(self, instance: "Instance", directory: Path, log: Path) -> None:
        # setsid forks before it returns, so a missing process has really exited.
        self.wait_for_login(
            instance, exited=lambda: not processes_under(directory), log_tail=lambda: self._log_tail(log)
        )

    def _spawn(self, argv: list[str], *, cwd: Path, log: Path) -> None:
        with open(log, "ab") as output:
            self._chown(log)
            result = subprocess.run(
                ["setsid", "--fork", *argv],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                **self._drop_privileges(),
            )
        if result.returncode:
            raise BackendError(f"Could not start {Path(argv[0]).name} (exit status {result.returncode}).")

    @staticmethod
    def _log_tail(log: Path, lines: int = 3) -> str:
        """The last interesting log lines, for a status message; password hashes are blanked."""
        try:
            text = HASHES.sub("<hash>", log.read_text(errors="replace")).strip().splitlines()
        except OSError:
            return "No server log was written."
        interesting = [line for line in text if "ERROR" in line or "#" in line] or text
        return "Server log: " + " | ".join(interesting[-lines:]) if interesting else "The server log is empty."

    # Files and users: what an engine's local_setup() may use (the Host protocol) -----------

    def run(self, argv: Sequence[str | Path], *, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            **self._drop_privileges(),
        )

    def mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(path)

    def write(self, path: Path, text: str) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        self._chown(path)

    def _drop_privileges(self) -> dict[str, Any]:
        """Popen arguments that run a child as `run_as` when the portal is root."""
        if os.geteuid() != 0:
            return {}
        account = self._account()
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def _account(self) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.run_as)
        except KeyError:
            raise BackendError(
                f"The portal runs as root but the user {self.run_as!r} that instances run as does not exist; "
                f"create it with `useradd --system {self.run_as}` (make run does this)."
            ) from None

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            account = self._account()
            os.chown(path, account.pw_uid, account.pw_gid)

    def _copy_as_owner(self, source: Path, target: Path) -> None:
        result = self.run(["cp", "-a", "--reflink=auto", source, target], cwd=source.parent)
        if result.returncode:
            raise BackendError(f"Could not copy the data template: {result.stderr.strip()}")
