"""Finding, starting and stopping the local backend's server processes.

A process belongs to an instance when it runs as the instance's own uid, or (where every server
runs as the portal's user) when its working directory is inside the instance's folder. Servers are
started with `setsid --fork`, so they belong to no portal process and outlive restarts of the web
server and the worker.
"""

import ctypes
import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

from ..errors import BackendError

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The whole environment of every program the local backend runs (servers, mariadb-install-db, cp,
# mkfs): none of the portal's own (SECRET_KEY, the encryption keys, the broker's password).
ENVIRONMENT = {"PATH": PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def processes(*, under: Path | None = None, uid: int | None = None) -> list[int]:
    """Live processes whose working directory is `under` (or below it), or that run as `uid`
    (real, effective or saved)."""
    found = []
    prefix = str(under) if under is not None else None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        if prefix is not None:
            cwd = _working_directory(Path("/proc") / entry.name) or ""
            if cwd == prefix or cwd.startswith(prefix + "/"):
                found.append(int(entry.name))
                continue
        if uid is not None and _runs_as(entry.name, uid):
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


def _runs_as(pid: str, uid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
    except OSError:
        return False
    if fields.get("State", "").strip().startswith("Z") and _working_directory(Path("/proc") / pid) is None:
        return False  # exited, threads and all; only its parent's wait() is left
    return str(uid) in fields.get("Uid", "").split()[:3]


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory is `directory` or below it."""
    return processes(under=directory)


def kill(*, under: Path, uid: int | None = None, timeout: float = 10.0) -> None:
    """SIGKILL every process of an instance (see `processes`) and wait until none is left."""
    deadline = time.monotonic() + timeout
    while pids := processes(under=under, uid=uid):
        if time.monotonic() > deadline:
            raise BackendError(f"Processes {pids} of {under} did not exit.")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)


def stop(*, under: Path, uid: int | None = None, timeout: float = 30.0) -> None:
    """SIGTERM every process of an instance so it can shut down cleanly; SIGKILL stragglers."""
    for pid in processes(under=under, uid=uid):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while processes(under=under, uid=uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill(under=under, uid=uid)


def kill_processes_under(directory: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process working in `directory` and wait until none is left."""
    kill(under=directory, timeout=timeout)


def spawn(
    argv: Sequence[str],
    *,
    cwd: Path,
    log: Path,
    user: tuple[int, int] | None = None,
    cgroups: Sequence[Path] = (),
) -> None:
    """Start `argv` detached (`setsid --fork`), in `cgroups` (the files Cgroups.prepare gives), as
    `user` (uid, gid; None: as we are), with its output appended to `log`, which it opens itself
    once it is that user.

    Between fork and exec the child joins the cgroups (still root), drops every privilege, then
    opens the log: everything the server ever runs is inside its limits, and root opens no file
    the server's uid could have planted. Returns once the server's process exists, so a server
    that is gone after this has exited.
    """
    report, reported = os.pipe()  # what went wrong in the child, if anything; it closes at exec

    def become_the_server() -> None:
        step = "join its cgroup"
        try:
            for procs in cgroups:  # "0": this process (its only thread, after fork)
                descriptor = os.open(procs, os.O_WRONLY)
                os.write(descriptor, b"0")
                os.close(descriptor)
            if user is not None:
                step = "drop privileges"
                uid, gid = user
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
                    raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
            step = f"open its log {log}"
            os.umask(0o077)
            _open_log(log)
        except OSError as exc:
            os.write(reported, f"could not {step}: {exc.strerror or exc}".encode())
            raise

    try:
        try:
            # One thread starts servers (a worker's task, or a test), as preexec_fn needs.
            result = subprocess.run(
                ["setsid", "--fork", *argv],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                env=ENVIRONMENT,
                preexec_fn=become_the_server,
                timeout=10,
            )
        finally:
            os.close(reported)
    except subprocess.SubprocessError as exc:
        problem = os.read(report, 4096).decode(errors="replace") or str(exc)
        raise BackendError(f"Could not start {Path(argv[0]).name}: {problem}.") from None
    finally:
        os.close(report)
    if result.returncode:
        raise BackendError(f"Could not start {Path(argv[0]).name} (exit status {result.returncode}).")


def _open_log(log: Path) -> None:
    """Make `log` the standard output and error: as the server's user, so a symlink planted there
    leads only where that user may write. Whatever else its user left in its place (a symlink, a
    FIFO, a folder) is put away first."""
    with suppress(FileNotFoundError):
        if not stat.S_ISREG(os.lstat(log).st_mode):
            if stat.S_ISDIR(os.lstat(log).st_mode):
                shutil.rmtree(log)
            else:
                os.unlink(log)
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.dup2(descriptor, 1)
    os.dup2(descriptor, 2)
    os.close(descriptor)
