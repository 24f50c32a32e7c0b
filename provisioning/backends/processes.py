"""Finding, starting and stopping the local backend's server processes.

A process belongs to an instance when it runs as the instance's own uid, or (where every server
runs as the portal's user) when its working directory is inside the instance's folder. Servers are
started with `setsid --fork`, so they belong to no portal process and outlive restarts of the web
server and the worker.
"""

import ctypes
import io
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO

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


def kill(*, under: Path, uid: int | None = None, timeout: float = 30.0) -> None:
    """SIGKILL every process of an instance (see `processes`) and wait until none is left.

    A killed process is gone only once the kernel has run its exit (freeing its memory, say): on a
    host at a load average of 19 a SIGKILLed server outlasted 10 s, and the delete failed."""
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


# The wrapper of a helper program: joins the cgroups whose files are its first arguments (as root,
# before anything of the helper runs), then execs the rest. `echo` is a builtin: the shell writes
# its own pid, which exec keeps.
JOIN_CGROUPS = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo 0 > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
CHUNK = 1024 * 1024


def run_beside(
    argv: Sequence[str],
    *,
    cwd: Path,
    user: tuple[int, int] | None,
    cgroups: Sequence[Path] = (),
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    secret: str | None = None,
    timeout: float,
) -> None:
    """Run a helper program (a backup tool, `cp`) in `cgroups` (the files Cgroups.join gives), as
    `user` (uid, gid; None: as we are), without privileges, and wait for it: `stdin` is copied to
    it, its output to `stdout`. `{secret}` in `argv` becomes a path to `secret`'s text, in memory
    only (a memfd the program inherits).

    The helper runs as the server does, inside its limits: its uid may ptrace it and make it run
    anything. No Python runs between fork and exec (the worker has threads: a lock held by one of
    them at fork would never be released in the child); `sh` joins the cgroups and `setpriv` drops
    the rest. It is killed, with its process group, after `timeout` s, or when this thread ends.

    Raises BackendError with the end of its error output if it fails or takes over `timeout` s.
    """
    deadline = time.monotonic() + timeout
    extra_fds: tuple[int, ...] = ()
    if secret is not None:
        memory = os.memfd_create("stockroom-secret", os.MFD_CLOEXEC)  # pass_fds hands it to the child only
        os.write(memory, secret.encode())
        # The program's own, readable by it alone: option files others may write are ignored.
        if user is not None:
            os.fchown(memory, *user)
        os.fchmod(memory, 0o400)
        extra_fds = (memory,)
        argv = [arg.replace("{secret}", f"/proc/self/fd/{memory}") for arg in argv]

    become = ["setpriv", "--no-new-privs", "--pdeathsig=KILL"]
    if user is not None:
        uid, gid = user
        become += [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    command = [*become, "--", *argv]
    if cgroups:
        command = ["sh", "-c", JOIN_CGROUPS, "sh", str(len(cgroups)), *map(str, cgroups), *command]

    name = Path(argv[0]).name
    try:
        with tempfile.TemporaryFile() as errors:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout is not None else subprocess.DEVNULL,
                stderr=errors,
                env=ENVIRONMENT,
                pass_fds=extra_fds,
                process_group=0,
                umask=0o077,
            )
            try:
                # Finished: its output read to the end, and it exited, both by the deadline.
                finished = False
                if _pump(process, stdin, stdout, deadline):
                    with suppress(subprocess.TimeoutExpired):
                        process.wait(max(0.0, deadline - time.monotonic()))
                    finished = process.poll() is not None
            finally:
                # Its whole group: what it started too. Before the wait that reaps it, so that its
                # process group id is still its own.
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                status = process.wait()
                for pipe in (process.stdin, process.stdout):
                    if pipe is not None:
                        pipe.close()
            if not finished:
                raise BackendError(f"{name} failed: it took more than {timeout:.0f} s and was stopped.")
            if status:
                errors.seek(max(0, os.fstat(errors.fileno()).st_size - 16384))
                raise helper_failed(name, errors.read(), status)
    finally:
        for descriptor in extra_fds:
            os.close(descriptor)


def helper_failed(name: str, errors: bytes, status: int) -> BackendError:
    """The error for a helper program that exited with `status`, from the end of its error output:
    the lines that say what went wrong, else the last ones."""
    lines = errors.decode(errors="replace").strip().splitlines()
    tail = [line for line in lines if re.search(r"error|fail|denied|can't|cannot", line, re.I)][-2:]
    why = " | ".join(tail or lines[-2:]) or (
        "it took too long" if status == -signal.SIGKILL else f"exit status {status}"
    )
    return BackendError(f"{name} failed: {why}")


def _pump(process: subprocess.Popen[bytes], source: IO[bytes] | None, sink: IO[bytes] | None, deadline: float) -> bool:
    """Copy `source` into the child's standard input and its output into `sink`, in this thread,
    until both are done; False if `deadline` (time.monotonic) came first. A child that stops
    reading its input ends the copy into it; one that holds its pipes open and idle (or a process
    its uid made inherit them) is left at the deadline, where a blocking read or write would wait
    for ever."""
    selector = selectors.DefaultSelector()
    if process.stdin is not None and source is not None:
        os.set_blocking(process.stdin.fileno(), False)
        selector.register(process.stdin, selectors.EVENT_WRITE)
    if process.stdout is not None and sink is not None:
        selector.register(process.stdout, selectors.EVENT_READ)
    pending = b""
    with selector:
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for key, _events in selector.select(left):
                pipe = key.fileobj
                assert isinstance(pipe, io.IOBase)
                if key.events & selectors.EVENT_READ:
                    assert sink is not None
                    chunk = os.read(pipe.fileno(), CHUNK)
                    if chunk:
                        sink.write(chunk)
                    else:
                        selector.unregister(pipe)
                    continue
                assert source is not None
                pending = pending or source.read(CHUNK)
                try:
                    if pending:
                        pending = pending[os.write(pipe.fileno(), pending) :]
                        continue
                except BlockingIOError:
                    continue
                except BrokenPipeError:
                    pass  # it stopped reading
                selector.unregister(pipe)  # all of it written, or no more wanted
                pipe.close()
    return True
