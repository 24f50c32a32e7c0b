"""Helper programs beside a containerised server (snapshots, log archiving and restores on the Docker backend).

They run in a container: the instance's own while its server runs (`docker exec`), or, while it is
stopped, a helper container of the same image with the instance's disk mounted. Either way they run
as the instance's uid, with no capability, no way to gain privileges and the container's limits,
and they see the container's files only: a symlink the tenant planted leads where the tenant's own
server could go anyway, never to a file of the host's. The image's own programs (mariabackup) match
the server's version. The portal talks to them through Docker's API only: what they read comes in
on their standard input, what they write goes out on their standard output.
"""

import io
import os
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, Any

from ..engines import Endpoint, Layout
from ..errors import BackendError
from .processes import helper_failed

STDOUT, STDERR = 1, 2
# Runs "$@" with its standard input (a secret) in the file $1 first: in the container's /dev/shm, its
# own memory, readable by its uid only, and removed when the program ends. Not a pipe: a program may
# read its option file more than once (mariabackup does).
WITH_SECRET = 'set -eC; umask 077; secret=$1; shift; trap \'rm -f -- "$secret"\' EXIT; cat > "$secret"; "$@" </dev/null'
ERRORS_KEPT = 16384  # bytes of a helper's error output kept for its error message


def exec_in(
    client: Any,
    container: Any,
    argv: Sequence[str],
    *,
    user: str,
    stdin: IO[bytes] | None = None,
    stdout: IO[bytes] | None = None,
    secret: str | None = None,
    timeout: float,
) -> None:
    """Run `argv` in the running `container` as `user` and wait for it: `stdin` is copied to it,
    its output to `stdout`. `{secret}` in `argv` becomes a path to `secret`'s text, which reaches
    the program on its standard input and waits in the container's memory (see WITH_SECRET): never
    on a disk, a command line or in an environment.

    Raises BackendError with the end of its error output if it fails or takes over `timeout` s.
    """
    import docker.errors

    name = PurePosixPath(argv[0]).name
    if secret is not None:
        if stdin is not None:
            raise ValueError("A program in a container is sent its secret on its standard input; it cannot have both.")
        stdin = io.BytesIO(secret.encode())
        path = f"/dev/shm/stockroom-{secrets.token_hex(16)}"
        argv = ["sh", "-c", WITH_SECRET, "sh", path, *(arg.replace("{secret}", path) for arg in argv)]
    api = client.api
    try:
        execution = api.exec_create(
            container.id, list(argv), stdin=stdin is not None, stdout=True, stderr=True, user=user
        )["Id"]
        connection = api.exec_start(execution, socket=True)
    except docker.errors.DockerException as exc:
        raise BackendError(f"Docker could not run {name} in the container: {exc}") from exc
    raw = getattr(connection, "_sock", connection)
    # What the HTTP client read past the response's headers is in its buffer: read through it.
    response = getattr(connection, "_response", None)
    reader = response.raw._fp.fp if response is not None else connection
    feeder = None
    if stdin is not None:
        feeder = threading.Thread(target=_feed, args=(stdin, raw), daemon=True)
        feeder.start()
    else:
        with suppress(OSError):
            raw.shutdown(socket.SHUT_WR)
    killer = threading.Timer(timeout, _kill, args=(api, execution))
    killer.start()
    errors = bytearray()
    try:
        for stream, data in _frames(reader):
            if stream == STDOUT and stdout is not None:
                stdout.write(data)
            elif stream == STDERR:
                errors += data
                del errors[:-ERRORS_KEPT]
    finally:
        killer.cancel()
        if feeder is not None:
            feeder.join()
        # The stream has ended, or is given up. The HTTP response first: it flushes its reader.
        for closable in (response, connection, raw):
            with suppress(Exception):
                if closable is not None:
                    closable.close()
    status = _exit_status(api, execution)
    if status:
        raise helper_failed(name, bytes(errors), status)


def _frames(reader: Any) -> Any:
    """(stream, data) of Docker's multiplexed output: an 8-byte header (stream, size), then data."""
    while len(header := _read(reader, 8)) == 8:
        stream, size = struct.unpack(">BxxxL", header)
        yield stream, _read(reader, size)


def _read(reader: Any, size: int) -> bytes:
    chunks = []
    while size:
        chunk = reader.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _feed(source: IO[bytes], sink: socket.socket) -> None:
    """Copy `source` to the program's standard input, then close it; a program that stops reading ends it."""
    with suppress(OSError):
        while chunk := source.read(1024 * 1024):
            sink.sendall(chunk)
        sink.shutdown(socket.SHUT_WR)


def _kill(api: Any, execution: str) -> None:
    """Kill a program that took too long (Docker has no call for it: its host pid, as root)."""
    with suppress(Exception):
        os.kill(api.exec_inspect(execution)["Pid"], signal.SIGKILL)


def _exit_status(api: Any, execution: str, wait: float = 10.0) -> int:
    """The program's exit status, once Docker has seen it exit (its output ends a moment before)."""
    deadline = time.monotonic() + wait
    while True:
        info = api.exec_inspect(execution)
        if not info["Running"] and info["ExitCode"] is not None:
            return int(info["ExitCode"])
        if time.monotonic() > deadline:
            return -signal.SIGKILL
        time.sleep(0.02)


def docker_calls(doer: str, daemon: str) -> Callable[..., Any]:
    """A function that runs one Docker SDK call and turns Docker's errors into a BackendError that
    says what failed: "`doer` could not <what>: <Docker's word>", or, when it cannot be reached,
    "`daemon` is not reachable (could not <what>)"."""

    def call(what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import docker.errors
        import requests.exceptions

        try:
            return method(*args, **kwargs)
        except docker.errors.APIError as exc:
            raise BackendError(f"{doer} could not {what}: {exc.explanation or exc}") from exc
        except (docker.errors.DockerException, requests.exceptions.ConnectionError) as exc:
            raise BackendError(f"{daemon} is not reachable (could not {what}).") from exc

    return call


class Relay:
    """Programs run elsewhere (in a container, or as a job on a swarm node) through `execute`,
    which a backend binds to the place: `Beside.run` and `Scratch.run` of the engines."""

    execute: Callable[..., None]

    def run(
        self,
        argv: Sequence[str],
        *,
        stdin: IO[bytes] | None = None,
        stdout: IO[bytes] | None = None,
        secret: str | None = None,
    ) -> None:
        self.execute(argv, stdin=stdin, stdout=stdout, secret=secret)


@dataclass(frozen=True)
class DockerBeside(Relay):
    """What an engine's snapshot and restore run beside a container (`Beside`): programs in a
    container as the instance's uid (see the module's docstring); the portal's clients through the
    server's checked socket."""

    layout: Layout  # as the programs see it
    endpoint: Endpoint | None  # None while the server is stopped
    execute: Callable[..., None]  # exec_in, bound to a container

    @property
    def admin(self) -> Endpoint:
        if self.endpoint is None:
            raise BackendError("The server has no socket: it is not running.")
        return self.endpoint
