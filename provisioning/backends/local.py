"""The embedded default: one server process per instance, as the engine says to start it.

Each instance owns `STOCKROOM_INSTANCES_DIR/<kind>/<id>/` (by default under DATA_DIR): the files
the portal writes (config, ACL, init file) and, in `server/`, everything the server writes (data,
log, pid, socket).

When the portal runs as root, each instance's server runs as a uid of its own (see `uids`), which
owns `server/` (0700) and nothing else; the instance folder and the portal's files in it are
root's, readable by the instance's group only, so nothing root does follows a path that uid can
change. The server opens its own log once it is that uid, and runs in a cgroup of its own with
the engine's memory limit and a pids limit (see `cgroups`). `server/` is a filesystem of the
instance's disk limit, loop-mounted from `disk.img` (see `disks`).

When the portal is not root, every server runs as the portal's user, as the portal's files do:
instances are not kept apart, and the kernel limits nothing. The reconciler then enforces the disk
limit (see `enforce_disk_limit`).
"""

import fcntl
import logging
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings

from ..engines import Endpoint, Layout, Replay, engines, get_engine
from . import files, processes
from .base import BackendError, BaseBackend
from .cgroups import Cgroups
from .disks import Disks, MiB, fullness
from .processes import kill_processes_under, processes_under
from .uids import InstanceUser, Uids, remove_files_of

if TYPE_CHECKING:
    from ..models import Instance

__all__ = ["LocalBackend", "kill_processes_under", "processes_under"]

logger = logging.getLogger(__name__)

HASHES = re.compile(r"\*[0-9A-Fa-f]{40}|#[0-9a-f]{64}")
SERVER = "server"  # in an instance's folder: everything its server writes
IMAGE = "disk.img"  # in an instance's folder: the filesystem mounted at SERVER
WRITES_REFUSED = "writes-refused"  # in an instance's folder: the reconciler made its server refuse writes
SCRATCH = "_scratch"  # in the instances folder: the throwaway folders of exports and verifies
SCRATCH_SLOTS = 8  # exports and verifies at once, each with a uid of its own
# (path, size, modification time) of a server program -> the version its `--version` names.
_program_versions: dict[tuple[str, int, int], str] = {}


class LocalBackend(BaseBackend):
    """Runs each instance's server as a process on this host.

    `programs` maps a program name an engine asks for (a server binary) to its path; a program
    not named there is looked up on PATH. `run_as` is the user that builds shared templates when
    the portal is root; instance uids are `uid_base + id`, claimed host-wide in `uid_claims` for
    the portal `portal_id`. Instance cgroups go under `cgroup_parent` (default
    `/stockroom-<portal_id>`), each limited to the engine's memory and pids limits.

    The portal logs in over the Unix socket in the instance's folder (`login_endpoint`), and
    writes the engine's `local_config` again before every start, so a server starts on whatever
    port the instance holds now (`moves_ports`).
    """

    moves_ports = True
    point_in_time = True

    def __init__(
        self,
        alias: str,
        *,
        run_as: str,
        programs: dict[str, str] | None = None,
        uid_base: int = 0x70000000,
        uid_claims: str = "/var/lib/stockroom/uids",
        portal_id: str = "stockroom",
        cgroup_parent: str = "",
    ):
        super().__init__(alias)
        self.run_as = run_as
        self.programs = dict(programs or {})
        self.uids = Uids(base=uid_base, claims=Path(uid_claims), portal=portal_id)
        self.cgroups = Cgroups(parent=cgroup_parent or f"stockroom-{portal_id}")

    @property
    def confined(self) -> bool:
        """Whether each instance runs as its own uid (the portal is root)."""
        return os.geteuid() == 0

    @cached_property
    def no_cgroups(self) -> str | None:
        """Why servers run without kernel limits here, or None when each has its cgroup."""
        return self.cgroups.problem()

    @cached_property
    def disks(self) -> Disks:
        return Disks(self.root / "_disks")

    @cached_property
    def no_disks(self) -> str | None:
        """Why the kernel does not enforce disk limits here, or None when each instance has a filesystem."""
        # The trial mounts in the instances folder: make it as instance uids need it first (0711),
        # or, made by the trial under the portal's umask 077, it would keep every server out.
        files.make_traversable(self.root)
        return self.disks.problem()

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
        directory = self.directory(instance)
        return Layout.under(
            directory, directory / SERVER, bind_address=settings.STOCKROOM_BIND_ADDRESS, port=instance.port
        )

    def program(self, name: str) -> Path:
        path = self.programs.get(name) or shutil.which(name, path=processes.PATH)
        if not path or not os.access(path, os.X_OK):
            raise BackendError(f"The program {name} is missing; install the package that provides it.")
        return Path(path)

    def user(self, instance: "Instance") -> InstanceUser | None:
        """The uid and gid the instance's server runs as; None when it runs as the portal's user."""
        return self.uids.of(instance.pk) if self.confined else None

    # The contract ----------------------------------------------------------------------

    def create(self, instance: "Instance") -> None:
        engine = get_engine(instance.kind)
        directory, layout = self.directory(instance), self.layout(instance)
        self.destroy(instance)  # a clean slate, should the task run a second time
        user = self.user(instance)
        if user is not None:
            self.uids.claim(user, _key(instance.kind, instance.pk))
        self._make_folders(directory, user, disk=instance.disk_limit)
        files.make_traversable(self.cache)  # where `run_as` builds shared templates
        setup = engine.local_setup(instance, layout, self)
        if setup.seed:
            self._copy_seed(setup.seed, Path(layout.data), user)
        for folder in setup.dirs:
            _make_own(folder, user)
        for name, text in setup.files.items():
            files.write(directory / name, text, group=user.gid if user else None)
        instance.mark("data_directory")
        self._run_server(instance, extra=setup.first_start_args)
        for name in setup.remove_after_first_start:
            (directory / name).unlink()

    def stop(self, instance: "Instance") -> None:
        processes.stop(under=self.directory(instance), uid=self._uid_to_end(instance.kind, instance.pk))

    def start(self, instance: "Instance") -> None:
        directory = self.directory(instance)
        # Whatever is left of a server that hung.
        processes.kill(under=directory, uid=self._uid_to_end(instance.kind, instance.pk))
        if (directory / IMAGE).exists() and not os.path.ismount(directory / SERVER):  # the host restarted
            self.disks.mount(directory / IMAGE, directory / SERVER)
        (directory / WRITES_REFUSED).unlink(missing_ok=True)  # a new server accepts them
        # The port may have changed since the last start (see BaseBackend.moves_ports).
        user = self.user(instance)
        for name, text in get_engine(instance.kind).local_config(instance, self.layout(instance)).items():
            files.write(directory / name, text, group=user.gid if user else None)
        self._run_server(instance)

    def set_password(self, instance: "Instance", password: str) -> None:
        directory, user = self.directory(instance), self.user(instance)
        group = user.gid if user else None
        with self.admin(instance) as admin:
            get_engine(instance.kind).set_password(
                instance,
                password,
                admin=admin,
                write=lambda name, text: files.write(directory / name, text, group=group),
            )

    def reload_tls(self, instance: "Instance") -> bool:
        engine, directory, user = get_engine(instance.kind), self.directory(instance), self.user(instance)
        for name, text in engine.tls_files(instance).items():
            files.write(directory / name, text, group=user.gid if user else None)
        try:
            with self.admin(instance) as admin:
                return engine.reload_tls(instance, admin=admin)
        except BackendError:  # not running: it reads them when it starts
            return False

    def memory(self, instance: "Instance") -> tuple[int | None, int | None]:
        if not self.confined or self.no_cgroups:
            return None, None
        cgroup = _cgroup(instance.kind, instance.pk)
        return self.cgroups.memory_limit(cgroup), self.cgroups.memory_in_use(cgroup)

    def set_memory_limit(self, instance: "Instance", memory: int) -> None:
        self.cgroups.set_memory_limit(_cgroup(instance.kind, instance.pk), memory)

    @contextmanager
    def admin(self, instance: "Instance") -> Iterator[Endpoint]:
        """Where the portal administers the server: its Unix socket, reached through a descriptor
        checked to be a socket of the instance's uid."""
        layout, user = self.layout(instance), self.user(instance)
        with files.unix_socket(Path(layout.socket), owner=user.uid if user else None) as socket:
            if socket is None:
                raise BackendError("The server has no socket: it is not running.")
            yield Endpoint(settings.STOCKROOM_BIND_ADDRESS, layout.port, socket=socket)

    def server_version(self, instance: "Instance") -> str:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).server_version(instance, admin)

    def host_version(self, kind: str) -> str:
        engine = get_engine(kind)
        program = self.program(engine.version_program)
        status = program.stat()  # a new package replaces the file: another size or time
        key = (str(program), status.st_size, status.st_mtime_ns)
        if key not in _program_versions:
            result = subprocess.run(
                [str(program), "--version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                env=processes.ENVIRONMENT,
                timeout=30,
                **self._drop_privileges(),
            )
            if result.returncode:
                raise BackendError(f"{program} --version failed: {(result.stderr or result.stdout).strip()[:200]}")
            _program_versions[key] = engine.program_version(result.stdout)
        return _program_versions[key]

    def client_connections(self, instance: "Instance") -> int:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).client_connections(instance, admin=admin)

    def restore(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        engine = get_engine(instance.kind)
        directory, layout, user = self.directory(instance), self.layout(instance), self.user(instance)
        self.stop(instance)
        processes.kill(under=directory, uid=self._uid_to_end(instance.kind, instance.pk))
        if (directory / IMAGE).exists() and not os.path.ismount(directory / SERVER):  # the host restarted
            self.disks.mount(directory / IMAGE, directory / SERVER)
        setup = engine.local_setup(instance, layout, self)
        with self._beside(instance) as beside:
            engine.restore(instance, beside, snapshot, replay)
            # The server's folders, made again if the snapshot lacked one: as its uid, since they
            # are the tenant's (root would follow a symlink put in their place).
            beside.run(["mkdir", "-p", "-m", "0700", "--", *map(str, setup.dirs)])
        (directory / WRITES_REFUSED).unlink(missing_ok=True)  # a new server accepts them
        # As at the first start: the accounts are made again from the instance's own credentials.
        for name, text in setup.files.items():
            files.write(directory / name, text, group=user.gid if user else None)
        self._run_server(instance, extra=setup.first_start_args)
        for name in setup.remove_after_first_start:
            (directory / name).unlink()

    def export_snapshot(self, kind: str, snapshot: IO[bytes], out: IO[bytes], *, database: str) -> None:
        with self._scratch(size=_size(snapshot)) as scratch:
            get_engine(kind).export(snapshot, scratch, out, database=database)

    def verify_snapshot(self, kind: str, snapshot: IO[bytes], *, database: str) -> str:
        with self._scratch(size=_size(snapshot)) as scratch:
            return get_engine(kind).verify(snapshot, scratch, database=database)

    @contextmanager
    def _scratch(self, *, size: int) -> Iterator["LocalScratch"]:
        """A throwaway folder under `_scratch/`, and a uid of its own to run programs as there
        (confined: one of SCRATCH_SLOTS uids just below the instances', claimed host-wide as
        instance uids are, and held by this process through a lock); emptied, and whatever ran as
        that uid ended, before and after."""
        folder = self.root / SCRATCH
        files.make_traversable(self.root)
        folder.mkdir(mode=0o711, exist_ok=True)
        os.chmod(folder, 0o711)  # a scratch uid goes through it to its own folder, and lists nothing
        for slot in range(SCRATCH_SLOTS):
            with open(folder / f"{slot}.lock", "a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                user = self._scratch_user(slot)
                work = folder / str(slot)
                self._clear_scratch(work, user)
                _make_own(work, user)
                try:
                    yield LocalScratch(
                        folder=work,
                        beside=LocalBeside(
                            layout=Layout.under(work, work, bind_address=settings.STOCKROOM_BIND_ADDRESS, port=0),
                            socket=None,
                            cwd=work,
                            user=(user.uid, user.gid) if user else None,
                            cgroups=(),
                            deadline=time.monotonic() + helper_time(size * 4),
                        ),
                    )
                finally:
                    self._clear_scratch(work, user)
                return
        raise BackendError(f"All {SCRATCH_SLOTS} scratch folders are in use; try again in a minute.")

    def _scratch_user(self, slot: int) -> InstanceUser | None:
        if not self.confined:
            return None
        user = InstanceUser(self.uids.base - 1 - slot, self.uids.base - 1 - slot)
        self.uids.claim(user, f"scratch-{slot}")  # no "/": never taken for an instance's (orphans)
        return user

    @staticmethod
    def _clear_scratch(work: Path, user: InstanceUser | None) -> None:
        processes.kill(under=work, uid=user.uid if user else None)
        shutil.rmtree(work, ignore_errors=True)  # never follows a symlink
        if user is not None:
            remove_files_of(user.uid)

    @contextmanager
    def _beside(self, instance: "Instance") -> Iterator["LocalBeside"]:
        layout, user = self.layout(instance), self.user(instance)
        cgroups = []
        if user is not None and not self.no_cgroups:
            engine = get_engine(instance.kind)
            cgroups = self.cgroups.join(
                _cgroup(instance.kind, instance.pk),
                memory=engine.memory_limit(instance.options),
                pids=engine.pids_limit,
            )
        with files.unix_socket(Path(layout.socket), owner=user.uid if user else None) as socket:
            yield LocalBeside(
                layout=layout,
                socket=socket,
                cwd=self.directory(instance) / SERVER,
                user=(user.uid, user.gid) if user else None,
                cgroups=tuple(cgroups),
                deadline=time.monotonic() + helper_time(instance.options.get("disk", 0)),
            )

    def login_endpoint(self, instance: "Instance") -> Endpoint:
        """The server's Unix socket: it is in the instance's folder, where nobody else can listen."""
        layout = self.layout(instance)
        return Endpoint(layout.bind_address, layout.port, socket=str(layout.socket))

    def probe(self, instance: "Instance", timeout: float = 2.0) -> None:
        """Log in over the server's socket, reached through a descriptor checked to be a socket of
        the instance's uid: its uid may put a symlink where the socket was, never a login goes there."""
        endpoint = self.login_endpoint(instance)
        if endpoint.socket is None:  # a subclass that logs in over TCP
            return super().probe(instance, timeout)
        user = self.user(instance)
        with files.unix_socket(Path(endpoint.socket), owner=user.uid if user else None) as socket:
            if socket is None:
                raise BackendError("The server has no socket: it is not running.")
            endpoint = Endpoint(endpoint.host, endpoint.port, socket=socket)
            get_engine(instance.kind).check_login(instance, endpoint, timeout=timeout)

    def instance_pids(self, instance: "Instance") -> set[int]:
        uid = self._uid_to_end(instance.kind, instance.pk)
        return set(processes.processes(under=self.directory(instance), uid=uid))

    def destroy(self, instance: "Instance") -> None:
        self._remove(instance.kind, instance.pk)

    def enforce_disk_limit(self, instance: "Instance") -> str | None:
        directory = self.directory(instance)
        return fullness(
            directory / SERVER,
            instance.disk_limit,
            refusing=(directory / WRITES_REFUSED).exists(),
            refuse=lambda refuse: self._refuse_writes(instance, refuse=refuse),
        )

    def why_down(self, instance: "Instance") -> str | None:
        if self.no_cgroups or not self.cgroups.oom_kills(_cgroup(instance.kind, instance.pk)):
            return None
        limit = self.cgroups.memory_limit(_cgroup(instance.kind, instance.pk))
        return "it ran out of memory: the kernel killed it at its memory limit" + (
            f" of {limit / MiB:g} MiB" if limit else ""
        )

    def check(self) -> str:
        for engine in engines().values():
            for name in engine.local_programs:
                self.program(name)
        files.make_traversable(self.root)
        if not os.access(self.root, os.W_OK):
            raise BackendError(f"Cannot write to {self.root}.")
        found = "Server programs found; the instances folder is writable."
        if not self.confined:
            name = pwd.getpwuid(os.geteuid()).pw_name
            return (
                f"{found} Not root: every instance runs as the portal's user {name!r}, so instances are not kept "
                "apart from each other or from the portal, and the kernel limits neither their memory nor their "
                "processes (only root may write cgroups)."
            )
        self.program("setpriv")
        found += f" Each instance runs as a uid of its own ({self.uids.base} + its id)"
        if self.no_cgroups:
            found += f", without kernel memory or pids limits: {self.no_cgroups}."
        else:
            found += f", in a cgroup of its own with memory and pids limits ({self.cgroups.describe()})."
        if self.no_disks:
            return f"{found} The reconciler enforces disk limits, not the kernel: {self.no_disks}."
        return f"{found} Its data is a loop-mounted filesystem of its disk limit."

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        found = {}
        for kind in engines():
            for directory in sorted((self.root / kind).glob("*")):
                if directory.name.isdigit() and int(directory.name) not in known_ids:
                    pids = processes.processes(under=directory, uid=self._uid_to_end(kind, int(directory.name)))
                    state = f"server running (pid {', '.join(map(str, pids))})" if pids else "no process"
                    found[_key(kind, int(directory.name))] = f"Folder {directory}; {state}."
        if self.confined:
            for key, uid in self.uids.held().items():
                kind, _, pk = key.partition("/")
                if key not in found and pk.isdigit() and int(pk) not in known_ids:
                    found[key] = f"uid {uid} is still claimed for it."
        if not self.no_cgroups:
            for name in self.cgroups.names():
                kind, _, pk = name.rpartition("-")
                if kind in engines() and pk.isdigit() and int(pk) not in known_ids:
                    found.setdefault(_key(kind, int(pk)), f"Its cgroup {name} is left.")
        return found

    def remove_orphan(self, key: str) -> None:
        kind, pk = key.split("/")
        self._remove(kind, int(pk))

    def forget_ready(self) -> None:
        if self.confined and not self.no_disks:
            self.disks.forget_ready()

    # Processes -------------------------------------------------------------------------

    def _run_server(self, instance: "Instance", *, extra: Sequence[str] = ()) -> None:
        directory, layout, user = self.directory(instance), self.layout(instance), self.user(instance)
        engine = get_engine(instance.kind)
        argv = [*engine.local_argv(self, directory / engine.config_name), *extra]
        log = Path(layout.log)
        cgroups = []
        if user is not None and not self.no_cgroups:
            memory = engine.memory_limit(instance.options)
            cgroups = self.cgroups.prepare(_cgroup(instance.kind, instance.pk), memory=memory, pids=engine.pids_limit)
        processes.spawn(argv, cwd=directory, log=log, user=(user.uid, user.gid) if user else None, cgroups=cgroups)
        self._wait_for_login(instance, directory, log)

    def _wait_for_login(self, instance: "Instance", directory: Path, log: Path) -> None:
        # spawn() returns once the server's own process runs, so a missing one has really exited.
        # It works in its folder, and in its cgroup, whose list is quicker to read.
        cgroup = _cgroup(instance.kind, instance.pk) if self.confined and not self.no_cgroups else None

        def exited() -> bool:
            return not (self.cgroups.members(cgroup) if cgroup else processes_under(directory))

        self.wait_for_login(instance, exited=exited, log_tail=lambda: self._log_tail(log))

    def _uid_to_end(self, kind: str, pk: int) -> int | None:
        """The uid whose processes are all the instance's: None when not confined, or when another
        portal's instance holds that uid (then only those working in its folder are)."""
        if not self.confined:
            return None
        user = self.uids.of(pk)
        return user.uid if self.uids.holds(user, _key(kind, pk)) else None

    def _remove(self, kind: str, pk: int) -> None:
        """Everything of one instance: its processes, folder, and (if confined) whatever else its
        uid has, and the uid's claim."""
        directory = self.root / kind / str(pk)
        uid = self._uid_to_end(kind, pk)
        if not directory.exists() and (uid is None or self.uids.holder(uid) is None):
            # Nothing was made (create claims the uid first, and this releases it last): nothing
            # can run as it. Spares a new instance's create a look at every process and folder.
            if self.confined and not self.no_cgroups:
                self.cgroups.remove(_cgroup(kind, pk))
            return
        processes.kill(under=directory, uid=uid)
        if self.confined:
            self.disks.unmount(directory / SERVER)
        shutil.rmtree(directory, ignore_errors=True)  # never follows a symlink
        if directory.exists():
            raise BackendError(f"Could not remove {directory}.")
        if self.confined and not self.no_cgroups:
            self.cgroups.remove(_cgroup(kind, pk))
        if uid is not None:
            remove_files_of(uid)
            self.uids.release(self.uids.of(pk), _key(kind, pk))

    @staticmethod
    def _log_tail(log: Path, lines: int = 3) -> str:
        """The last interesting log lines, for a status message; password hashes are blanked."""
        try:
            text = HASHES.sub("<hash>", files.read_tail(log)).strip().splitlines()
        except OSError:
            return "No server log was written."
        interesting = [line for line in text if "ERROR" in line or "#" in line] or text
        return "Server log: " + " | ".join(interesting[-lines:]) if interesting else "The server log is empty."

    def _refuse_writes(self, instance: "Instance", *, refuse: bool) -> None:
        directory, layout, user = self.directory(instance), self.layout(instance), self.user(instance)
        with files.unix_socket(Path(layout.socket), owner=user.uid if user else None) as socket:
            get_engine(instance.kind).refuse_writes(
                instance, refuse, admin=Endpoint(settings.STOCKROOM_BIND_ADDRESS, layout.port, socket=socket)
            )
        if refuse:
            files.write(directory / WRITES_REFUSED, "")
        else:
            (directory / WRITES_REFUSED).unlink(missing_ok=True)

    # An instance's own folders ---------------------------------------------------------

    def _make_folders(self, directory: Path, user: InstanceUser | None, *, disk: int) -> None:
        """The instance's folder (root:<its group> 0750 when confined) and `server/` in it, the
        only place its uid may write: a filesystem of `disk` bytes where the kernel can mount one."""
        files.make_traversable(directory.parent)
        directory.mkdir(mode=0o700)
        server = directory / SERVER
        server.mkdir(mode=0o700)
        if user is not None:
            os.chown(directory, 0, user.gid)
            os.chmod(directory, 0o750)
            if not self.no_disks:
                self.disks.provide(directory / IMAGE, server, disk, usual=disk in self.usual_disks())
                (server / "lost+found").rmdir()  # root's, and e2fsck makes it again if it needs it
        _make_own(server, user)

    def _copy_seed(self, source: Path, target: Path, user: InstanceUser | None) -> None:
        if user is None:
            result = self.run(["cp", "-a", "--reflink=auto", source, target], cwd=source.parent)
        else:  # nothing runs as the instance's uid yet: its new folder holds still while it is given away
            result = subprocess.run(
                ["cp", "-a", "--reflink=auto", str(source), str(target)],
                capture_output=True,
                text=True,
                env=processes.ENVIRONMENT,
            )
        if result.returncode:
            raise BackendError(f"Could not copy the data template: {result.stderr.strip()}")
        if user is not None:
            os.lchown(target, user.uid, user.gid)
            for folder, names, file_names in os.walk(target):
                for name in (*names, *file_names):
                    os.lchown(os.path.join(folder, name), user.uid, user.gid)

    # Shared templates: what an engine's local_setup() may use (the Host protocol) ---------

    def run(self, argv: Sequence[str | Path], *, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in argv],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=processes.ENVIRONMENT | {"HOME": str(cwd), "TMPDIR": str(cwd)},
            **self._drop_privileges(),
        )

    def mkdir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._chown(path)

    def write(self, path: Path, text: str) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
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
                f"The portal runs as root but the user {self.run_as!r} that builds shared templates does not "
                f"exist; create it with `useradd --system {self.run_as}` (make run does this)."
            ) from None

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            account = self._account()
            os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)


@dataclass(frozen=True)
class LocalBeside:
    """What an engine's snapshot and restore run beside a local server (`Beside`): programs as
    the instance's uid, without privileges; the portal's clients through its checked socket."""

    layout: Layout
    socket: str | None  # None while the server is stopped
    cwd: Path
    user: tuple[int, int] | None
    cgroups: tuple[Path, ...]  # the instance's (Cgroups.join): its helpers count toward its limits
    deadline: float  # time.monotonic() by which every helper of this snapshot or restore has ended

    @property
    def admin(self) -> Endpoint:
        if self.socket is None:
            raise BackendError("The server has no socket: it is not running.")
        return Endpoint(self.layout.bind_address, self.layout.port, socket=self.socket)

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        processes.run_beside(
            argv,
            cwd=self.cwd,
            user=self.user,
            cgroups=self.cgroups,
            stdin=stdin,
            stdout=stdout,
            secret=secret,
            timeout=max(0.0, self.deadline - time.monotonic()),
        )


@dataclass(frozen=True)
class LocalScratch:
    """What an engine's export and verify run in (`Scratch`): a throwaway folder, and programs run
    there as the scratch uid, without privileges."""

    folder: Path
    beside: LocalBeside

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        self.beside.run(argv, stdin=stdin, stdout=stdout, secret=secret)


def _size(file: IO[bytes]) -> int:
    """The bytes left to read in a stored snapshot's open file."""
    here = file.tell()
    end = file.seek(0, os.SEEK_END)
    file.seek(here)
    return end - here


def helper_time(disk: int) -> float:
    """Seconds the helpers of one snapshot or restore may take, all told: a minute, and the
    instance's whole disk at 20 MiB/s; well within the task's time limit, so that the worker
    ends them and says so, rather than Celery killing the worker and leaving them behind."""
    limit: float = settings.STOCKROOM_TASK_TIME_LIMIT
    return min(60 + disk / (20 * 1024 * 1024), limit * 0.6)


def _key(kind: str, pk: int) -> str:
    return f"{kind}/{pk}"


def _cgroup(kind: str, pk: int) -> str:
    return f"{kind}-{pk}"


def _make_own(path: Path, user: InstanceUser | None) -> None:
    """A folder the instance's server may write in (0700, its uid's when confined)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    if user is not None:
        os.lchown(path, user.uid, user.gid)
