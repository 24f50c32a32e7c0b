"""Finding, starting and stopping the local backend's server processes.

A process belongs to an instance when it runs as the instance's own uid, or (where every server
runs as the portal's user) when its working directory is inside the instance's folder. Servers are
started with `setsid --fork`, so they belong to no portal process and outlive restarts of the web
server and the worker.
"""

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from ..errors import BackendError

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# The root part of a launch: join the cgroups named by the first arguments (their count first),
# then exec the rest, which drops privileges. Joining first means everything the server ever
# runs is inside its limits.
JOIN_CGROUPS = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 1; shift; n=$((n - 1)); done; exec "$@"'
# The server's part, after privileges are dropped: it opens its own log ($0), then becomes the
# server. Whatever its uid left there instead of a log (a symlink, a FIFO) is put away first.
OPEN_LOG = (
    'umask 077; if [ -L "$0" ] || { [ -e "$0" ] && [ ! -f "$0" ]; }; then rm -rf "$0"; fi; '
    'exec >>"$0" 2>&1 </dev/null; exec "$@"'
)


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
    """Start `argv` detached, in `cgroups`, as `user` (uid, gid; None: as we are), with its output
    appended to `log`, which the server opens itself once it is that user.

    Returns once the server's own process runs (its launch has either failed, and this raises
    with what went wrong, or opened the log), so a server that is gone after this has exited.
    """
    launch = ["sh", "-c", OPEN_LOG, str(log), *argv]
    if user is not None:
        uid, gid = user
        launch = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--no-new-privs", "--", *launch]
    if cgroups:
        launch = ["sh", "-c", JOIN_CGROUPS, "launch", str(len(cgroups)), *map(str, cgroups), *launch]
    # Standard error is a pipe until OPEN_LOG replaces it with the log: reading it to its end
    # waits exactly for the launch, and gives its errors.
    try:
        result = subprocess.run(
            ["setsid", "--fork", *launch],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        raise BackendError(f"Starting {Path(argv[0]).name} took more than 10 s.") from None
    if result.returncode or result.stderr.strip():
        problem = result.stderr.strip() or f"exit status {result.returncode}"
        raise BackendError(f"Could not start {Path(argv[0]).name}: {problem}")
