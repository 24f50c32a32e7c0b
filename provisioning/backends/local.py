"""The embedded default: one `mariadbd` or `redis-server` process per instance.

Each instance owns `STOCKROOM_INSTANCES_DIR/<kind>/<id>/` (by default under DATA_DIR): its
config file, data, log and pid.
Servers are started with `setsid --fork`, so they belong to no portal process and outlive
restarts of the web server and the worker. A process belongs to an instance when its
working directory is inside the instance's directory; that is how `destroy` finds it even
when no pid file was written.
"""

import fcntl
import hashlib
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pymysql
from django.conf import settings
from django.template.loader import render_to_string

from ..engines import Layout, get_engine
from ..engines.mysql import ADMIN_TIMEOUTS, ADMIN_USERNAME, MySQL
from .base import BackendError, BaseBackend

logger = logging.getLogger(__name__)

STORAGE_TEMPLATE = "provisioning/engines/mysql-storage.cnf"
HASHES = re.compile(r"\*[0-9A-Fa-f]{40}|#[0-9a-f]{64}")


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` or below it."""
    found = []
    prefix = str(directory)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, a zombie, or not ours to read
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            found.append(int(entry.name))
    return found


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
    def __init__(self, alias: str, *, run_as: str, mariadbd: str, mariadb_install_db: str, redis_server: str):
        super().__init__(alias)
        self.run_as = run_as
        self.mariadbd = mariadbd
        self.mariadb_install_db = mariadb_install_db
        self.redis_server = redis_server

    # Paths -----------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        return settings.STOCKROOM_INSTANCES_DIR

    def directory(self, instance) -> Path:
        return self.root / instance.kind / str(instance.pk)

    def layout(self, instance) -> Layout:
        return Layout.under(self.directory(instance), bind_address=settings.STOCKROOM_BIND_ADDRESS, port=instance.port)

    # The contract ----------------------------------------------------------------------

    def create(self, instance) -> None:
        engine = get_engine(instance.kind)
        directory, layout = self.directory(instance), self.layout(instance)
        self.destroy(instance)  # a clean slate, should the task run a second time
        self._mkdir(directory)
        init_file = None
        if isinstance(engine, MySQL):
            self._copy_as_owner(self._mariadb_template(), layout.data)
            self._mkdir(layout.files)
            self._mkdir(layout.tmp)
            init_file = directory / "init.sql"
            self._write(init_file, engine.init_sql(instance))
        else:
            self._mkdir(layout.data)
            self._write(layout.acl, engine.acl_lines(instance, instance.password))
        self._write(directory / engine.config_name, engine.render_config(instance, layout))
        instance.mark("data_directory")
        self._run_server(instance, init_file=init_file)
        if init_file:
            init_file.unlink()

    def stop(self, instance) -> None:
        stop_processes_under(self.directory(instance))

    def start(self, instance) -> None:
        kill_processes_under(self.directory(instance))  # whatever is left of a server that hung
        self._run_server(instance)

    def set_password(self, instance, password: str) -> None:
        engine = get_engine(instance.kind)
        if isinstance(engine, MySQL):
            socket = str(self.layout(instance).socket)
            admin = pymysql.connect(
                unix_socket=socket, user=ADMIN_USERNAME, password=instance.admin_password, **ADMIN_TIMEOUTS
            )
            try:
                engine.set_password(admin, instance, password)
            finally:
                admin.close()
        else:
            self._write(self.layout(instance).acl, engine.acl_lines(instance, password))
            engine.reload_acl(instance, host=settings.STOCKROOM_BIND_ADDRESS, port=instance.port)

    def destroy(self, instance) -> None:
        directory = self.directory(instance)
        kill_processes_under(directory)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise BackendError(f"Could not remove {directory}.")

    def check(self) -> str:
        missing = [path for path in (self.mariadbd, self.redis_server) if not os.access(path, os.X_OK)]
        if missing:
            raise BackendError(f"Missing server binaries: {', '.join(missing)}.")
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise BackendError(f"Cannot write to {self.root}.")
        return "Server binaries found; the instances folder is writable."

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        found = {}
        for kind in ("mysql", "redis"):
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

    def _run_server(self, instance, *, init_file: Path | None = None) -> None:
        directory, layout = self.directory(instance), self.layout(instance)
        config = directory / get_engine(instance.kind).config_name
        if instance.kind == "mysql":
            argv = [self.mariadbd, f"--defaults-file={config}"]
            if init_file:
                argv.append(f"--init-file={init_file}")
        else:
            argv = [self.redis_server, str(config)]
        self._spawn(argv, cwd=directory, log=layout.log)
        self._wait_for_login(instance, directory, layout.log)

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

    def _wait_for_login(self, instance, directory: Path, log: Path) -> None:
        # setsid forks before it returns, so a missing process has really exited.
        self.wait_for_login(
            instance, exited=lambda: not processes_under(directory), log_tail=lambda: self._log_tail(log)
        )

    @staticmethod
    def _log_tail(log: Path, lines: int = 3) -> str:
        """The last interesting log lines, for a status message; password hashes are blanked."""
        try:
            text = HASHES.sub("<hash>", log.read_text(errors="replace")).strip().splitlines()
        except OSError:
            return "No server log was written."
        interesting = [line for line in text if "ERROR" in line or "#" in line] or text
        return "Server log: " + " | ".join(interesting[-lines:]) if interesting else "The server log is empty."

    # MariaDB's data-directory template -------------------------------------------------

    def _mariadb_template(self) -> Path:
        """A pristine data directory, made once per server version and storage settings.

        Copying it is much faster than running mariadb-install-db for every instance.
        """
        storage = render_to_string(STORAGE_TEMPLATE)
        binary = Path(self.mariadbd)
        try:
            stat = binary.stat()
        except FileNotFoundError:
            raise BackendError(f"{self.mariadbd} is missing: install the mariadb-server package.") from None
        recipe = f"{binary}:{stat.st_size}:{stat.st_mtime_ns}\n{storage}"
        key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
        templates = self.root / "_templates"
        target = templates / f"mariadb-{key}"
        if (target / "data").is_dir():
            return target / "data"
        templates.mkdir(parents=True, exist_ok=True)
        with open(templates / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "data").is_dir():
                self._build_mariadb_template(target, storage)
        return target / "data"

    def _build_mariadb_template(self, target: Path, storage: str) -> None:
        building = target.with_name(target.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        self._mkdir(building)
        config = building / "my.cnf"
        self._write(config, "[mysqld]\n" + storage)
        result = subprocess.run(
            [
                self.mariadb_install_db,
                f"--defaults-file={config}",
                f"--datadir={building / 'data'}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            cwd=building,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            **self._drop_privileges(),
        )
        if result.returncode:
            shutil.rmtree(building, ignore_errors=True)
            tail = (result.stderr or result.stdout).strip().splitlines()[-2:]
            raise BackendError(f"mariadb-install-db failed: {' | '.join(tail)}")
        building.rename(target)
        logger.info("Built MariaDB data-directory template %s", target)

    # Files and users -------------------------------------------------------------------

    def _drop_privileges(self) -> dict:
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

    def _mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(path)

    def _write(self, path: Path, text: str) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
        self._chown(path)

    def _copy_as_owner(self, source: Path, target: Path) -> None:
        result = subprocess.run(
            ["cp", "-a", "--reflink=auto", str(source), str(target)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            **self._drop_privileges(),
        )
        if result.returncode:
            raise BackendError(f"Could not copy the MariaDB data template: {result.stderr.strip()}")
