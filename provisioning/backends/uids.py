"""One uid per local instance, when the portal runs as root.

An instance's uid (and gid, the same number) is `base + instance id`. It has no account in
/etc/passwd: the servers need none, and a number costs nothing to make or remove.
Two portals on one host must not hand out the same uid, so each uid is claimed host-wide (a file
named after it in a root-only folder, saying which portal's instance holds it); a second portal
whose base overlaps is refused, instead of sharing a uid. When the instance goes, so does
everything of its uid: its processes, its files (the instance folder, and whatever it left in the
host's world-writable folders) and its claim.
"""

import errno
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError
from . import files

LAST_UID = 2**31 - 2  # some tools take larger uids for negative numbers
# Where any uid may create files; an instance's leftovers there are removed with it.
WORLD_WRITABLE = (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm"))


@dataclass(frozen=True)
class InstanceUser:
    uid: int
    gid: int


class Uids:
    """Hands out instance uids from `base`, claimed in `claims` on behalf of the portal `portal`."""

    def __init__(self, *, base: int, claims: Path, portal: str):
        self.base = base
        self.claims = claims
        self.portal = portal

    def of(self, pk: int) -> InstanceUser:
        uid = self.base + pk
        if not 0 < uid <= LAST_UID:
            raise BackendError(
                f"Instance {pk} would run as uid {uid}, outside 1..{LAST_UID}; lower STOCKROOM_UID_BASE."
            )
        return InstanceUser(uid, uid)

    def _holder(self, key: str) -> str:
        return f"{self.portal} {key}\n"

    def claim(self, user: InstanceUser, key: str) -> None:
        """Take `user.uid` for the instance `key` ("kind/id"); refuse one that another portal or
        a real account holds."""
        try:
            account = pwd.getpwuid(user.uid)
        except KeyError:
            pass
        else:
            raise BackendError(
                f"uid {user.uid} belongs to the account {account.pw_name!r}; instances need uids no account "
                "has: choose another STOCKROOM_UID_BASE."
            )
        files.make_traversable(self.claims.parent)  # where instances may live too (see settings)
        self.claims.mkdir(mode=0o700, exist_ok=True)
        path = self.claims / str(user.uid)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            holder = self.holder(user.uid)
            if holder == self._holder(key):
                return
            raise BackendError(
                f"uid {user.uid} is held by another portal's instance ({(holder or '?').strip()}); "
                "give each portal on a host its own STOCKROOM_UID_BASE."
            ) from None
        with os.fdopen(descriptor, "w") as file:
            file.write(self._holder(key))

    def holder(self, uid: int) -> str | None:
        try:
            return (self.claims / str(uid)).read_text()
        except FileNotFoundError:
            return None

    def holds(self, user: InstanceUser, key: str) -> bool:
        """Whether this portal's instance `key` holds `user.uid` (or nobody does, so that what
        runs as it can be nobody else's)."""
        return self.holder(user.uid) in (None, self._holder(key))

    def release(self, user: InstanceUser, key: str) -> None:
        if self.holder(user.uid) == self._holder(key):
            (self.claims / str(user.uid)).unlink(missing_ok=True)

    def held(self) -> dict[str, int]:
        """This portal's claims: instance key -> uid."""
        found = {}
        if self.claims.is_dir():
            for path in self.claims.iterdir():
                portal, _, key = path.read_text().strip().partition(" ")
                if portal == self.portal and path.name.isdigit():
                    found[key] = int(path.name)
        return found


def remove_files_of(uid: int) -> None:
    """Remove what `uid` made in the host's world-writable folders (and the world-writable folders
    in them). Its processes must be gone: nothing then moves under our feet, and no path is
    followed, each step is relative to an open folder."""
    for folder in WORLD_WRITABLE:
        try:
            descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            _sweep(descriptor, uid, depth=2)
        finally:
            os.close(descriptor)


def _sweep(folder: int, uid: int, *, depth: int) -> None:
    for name in os.listdir(folder):
        try:
            status = os.stat(name, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            continue
        directory = stat.S_ISDIR(status.st_mode)
        if status.st_uid == uid:
            if directory:
                shutil.rmtree(name, dir_fd=folder, ignore_errors=True)
            else:
                os.unlink(name, dir_fd=folder)
        elif directory and depth > 1 and status.st_mode & stat.S_IWOTH:
            try:
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                    continue
                raise
            try:
                _sweep(inner, uid, depth=depth - 1)
            finally:
                os.close(inner)
