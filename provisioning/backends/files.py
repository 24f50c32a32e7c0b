"""What the portal reads and writes of an instance's files, without following a path that the
instance's uid could change.

The portal may run as root, and an instance's server may plant a symlink, a FIFO or a huge file
wherever its uid can write. So files are opened relative to an open folder and never through a
symlink; the files the portal writes live in a folder the instance's uid cannot change at all.
"""

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import BackendError

NO_FOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@contextmanager
def folder(path: Path) -> Iterator[int]:
    """An open descriptor of the folder `path`, which must not be a symlink."""
    descriptor = os.open(path, NO_FOLLOW_DIR)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def make_traversable(path: Path) -> None:
    """Make the folder `path` and any missing parents 0711: instance servers and `run_as` pass
    through, nobody lists. Explicit, since portal processes run with umask 077."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for created in reversed(missing):
        with suppress(FileExistsError):  # another worker made it meanwhile
            created.mkdir()
        os.chmod(created, 0o711)


def write(path: Path, text: str, *, group: int | None = None) -> None:
    """Replace the file `path` with `text` at once: 0600, or root:`group` 0640 for a server that
    runs as `group` to read. Its folder must be one that only the portal can change."""
    temporary = f".{path.name}.new"
    with folder(path.parent) as parent:
        try:
            os.unlink(temporary, dir_fd=parent)
        except FileNotFoundError:
            pass
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(temporary, flags, 0o600, dir_fd=parent)
        with os.fdopen(descriptor, "w") as file:
            if group is not None:
                os.fchown(descriptor, 0, group)
                os.fchmod(descriptor, 0o640)
            file.write(text)
        os.rename(temporary, path.name, src_dir_fd=parent, dst_dir_fd=parent)


def read_tail(path: Path, size: int = 64 * 1024) -> str:
    """The last `size` bytes of the regular file `path` as text; raises OSError if it is missing,
    a symlink or anything but a regular file."""
    with folder(path.parent) as parent:
        descriptor = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(f"{path} is not a regular file")
        file.seek(max(0, status.st_size - size))
        return file.read(size).decode(errors="replace")


@contextmanager
def unix_socket(path: Path, *, owner: int | None) -> Iterator[str | None]:
    """A path that reaches the Unix socket `path` only if it is a socket (owned by `owner`, if
    given), wherever `path` is pointed later: connecting through it never follows a symlink.
    None if there is no such file (the server makes no socket, or is not running)."""
    with folder(path.parent) as parent:
        try:
            descriptor = os.open(path.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except FileNotFoundError:
            yield None
            return
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISSOCK(status.st_mode) or (owner is not None and status.st_uid != owner):
            raise BackendError(f"{path} is not the server's socket.")
        yield f"/proc/self/fd/{descriptor}"
    finally:
        os.close(descriptor)
