"""An RDB taken from a running server over its replication protocol, as `redis-cli --rdb` does.

The server sends its data as of a fork to the connection itself, so the portal never opens a file
in the server's folder, where the server's uid could have put a FIFO, a huge file or a symlink to
the ACL file in the dump's place.
"""

import socket
import time
from typing import IO

from ...errors import BackendError
from ..base import Endpoint

CHUNK = 1024 * 1024
MARK_LENGTH = 40  # the random end mark of a diskless transfer: `$EOF:<mark>\r\n` … data … `<mark>`
LINE_LIMIT = 1024


def read_rdb(
    endpoint: Endpoint, *, username: str, password: str, out: IO[bytes], timeout: float, deadline: float
) -> int:
    """Write the server's RDB to `out` and return its size: AUTH as `username`, `REPLCONF rdb-only
    1` (Redis 7: the server sends the RDB and no command stream after it), `SYNC`.

    Each read waits at most `timeout` s, and the whole transfer ends by `deadline`
    (time.monotonic()); BackendError otherwise, or if the server refuses.
    """
    if endpoint.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.settimeout(timeout)
        address: str | tuple[str, int] = endpoint.socket
    else:
        connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        connection.settimeout(timeout)
        address = (endpoint.host, endpoint.port)
    try:
        connection.connect(address)
        reader = connection.makefile("rb")
        for command in (("AUTH", username, password), ("REPLCONF", "rdb-only", "1")):
            connection.sendall(_command(*command))
            answer = reader.readline(LINE_LIMIT)
            if answer != b"+OK\r\n":
                raise BackendError(f"The server refused {command[0]}: {_text(answer)}")
        connection.sendall(_command("SYNC"))
        while True:  # newlines keep the connection alive until the data comes
            header = reader.readline(LINE_LIMIT)
            _check(deadline)
            if header != b"\n":
                break
        if header.startswith(b"$EOF:") and header.endswith(b"\r\n") and len(header) == 5 + MARK_LENGTH + 2:
            return _copy_to_mark(reader, out, header[5 : 5 + MARK_LENGTH], deadline)
        if header.startswith(b"$") and header.endswith(b"\r\n") and header[1:-2].isdigit():
            return _copy_length(reader, out, int(header[1:-2]), deadline)
        raise BackendError(f"The server answered SYNC with {_text(header)}")
    except TimeoutError:
        raise BackendError(f"The server sent nothing for {timeout:.0f} s while it sent its data.") from None
    except OSError as exc:
        raise BackendError(f"Could not read the server's data: {exc.strerror or exc}.") from None
    finally:
        connection.close()


def _copy_length(reader: IO[bytes], out: IO[bytes], length: int, deadline: float) -> int:
    left = length
    while left:
        chunk = reader.read(min(CHUNK, left))
        if not chunk:
            raise BackendError("The server closed the connection before the end of its data.")
        out.write(chunk)
        left -= len(chunk)
        _check(deadline)
    return length


def _copy_to_mark(reader: IO[bytes], out: IO[bytes], mark: bytes, deadline: float) -> int:
    # The data is followed by the mark and nothing else: hold back the last bytes read until
    # they are known not to be it.
    held, size = b"", 0
    while True:
        chunk = reader.read1(CHUNK)  # type: ignore[attr-defined]
        if not chunk:
            raise BackendError("The server closed the connection before the end of its data.")
        held += chunk
        if held.endswith(mark):
            out.write(held[: -len(mark)])
            return size + len(held) - len(mark)
        if len(held) > len(mark):
            out.write(held[: -len(mark)])
            size += len(held) - len(mark)
            held = held[-len(mark) :]
        _check(deadline)


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise BackendError("The server took too long to send its data.")


def _command(*words: str) -> bytes:
    parts = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _text(answer: bytes) -> str:
    return answer.decode(errors="replace").strip()[:200] or "nothing"
