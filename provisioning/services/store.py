"""The store of snapshots and archived logs: where their bytes live (the `snapshots` storage, under
STOCKROOM_SNAPSHOT_DIR by default, never on an instance's own disk), how much of an owner's
STOCKROOM_SNAPSHOT_QUOTA_BYTES is left, and how a copy is kept and read back checked.
"""

import hashlib
import tempfile
from collections.abc import Callable
from typing import IO

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files import File
from django.core.files.storage import Storage, storages
from django.db.models import Sum

from ..backends.base import BackendError
from ..engines.base import Bounded
from ..models import Instance, LogFile, Snapshot, SnapshotStatus
from ..options import describe_size

STORAGE = "snapshots"  # the alias in STORAGES
CHUNK = 1024 * 1024


def storage() -> Storage:
    return storages[STORAGE]


def digest(file: IO[bytes]) -> tuple[str, int]:
    """`sha256:<hex>` and the size of what is left to read in `file`."""
    hasher, size = hashlib.sha256(), 0
    while chunk := file.read(CHUNK):
        hasher.update(chunk)
        size += len(chunk)
    return f"sha256:{hasher.hexdigest()}", size


def stored(owner: User) -> int:
    """Bytes the owner's ready snapshots and archived logs take in the store."""
    made = Snapshot.objects.filter(owner=owner, status=SnapshotStatus.READY).aggregate(total=Sum("size_bytes"))
    logs = LogFile.objects.filter(owner=owner).aggregate(total=Sum("size_bytes"))
    return (made["total"] or 0) + (logs["total"] or 0)


def room(owner: User, *, besides: Snapshot | None = None) -> int:
    """Bytes left of the owner's quota, which their snapshots and archived logs share. A snapshot
    still being made counts as its instance's whole disk (the most it can take: its copy is cut
    off there), so snapshots made at once cannot together pass the quota."""
    making = Snapshot.objects.filter(owner=owner, status=SnapshotStatus.CREATING, instance__isnull=False)
    if besides is not None:
        making = making.exclude(pk=besides.pk)
    reserved = sum(instance.disk_limit for instance in Instance.objects.filter(snapshots__in=making))
    return settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES - stored(owner) - reserved


def limit(instance: Instance, *, besides: Snapshot | None = None) -> tuple[int, str]:
    """The most bytes a copy of the instance's data may take, and why: no more than its disk holds
    (a copy bigger than that is not its data: sparse files, say), nor than is left of the quota."""
    disk, left = instance.disk_limit, room(instance.owner, besides=besides)
    if left <= 0:
        quota = describe_size(settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES)
        raise BackendError(f"Your snapshots and logs, with those being made, take all of your {quota} snapshot quota.")
    if left < disk:
        return left, f"The copy passed what is left of your snapshot quota ({describe_size(left)})."
    return disk, f"The copy passed the instance's disk size ({describe_size(disk)}); it cannot be its data."


def keep(path: str, fill: Callable[[IO[bytes]], None], *, most: tuple[int, str]) -> tuple[str, str, int]:
    """Store at `path` what fill() writes, at most `most[0]` bytes (else TooLarge with `most[1]`);
    return the stored name, its checksum and size. It is written to an unnamed file first, so a
    worker killed meanwhile leaves nothing behind; a save cut short (a full disk) is removed."""
    with tempfile.TemporaryFile(dir=settings.STOCKROOM_SNAPSHOT_DIR) as spool:
        fill(Bounded(spool, *most))  # type: ignore[arg-type]
        spool.seek(0)
        checksum, size = digest(spool)
        spool.seek(0)
        name = storage().get_available_name(path)  # free: the worker holds the instance
        try:
            name = storage().save(name, File(spool))
        except BaseException:
            storage().delete(name)
            raise
    return name, checksum, size


def open_checked(name: str, checksum: str, what: str, *, then: str = "nothing was restored") -> IO[bytes]:
    """The stored file `name`, open from its start, once its checksum matches; BackendError naming
    `what` (and `then`, what that means) if it is missing or damaged."""
    named = what[0].upper() + what[1:]
    try:
        file = storage().open(name, "rb")
    except FileNotFoundError:
        raise BackendError(f"{named} is missing from the store; {then}.") from None
    found, _ = digest(file)
    if found != checksum:
        file.close()
        raise BackendError(f"{named} is damaged (its checksum does not match); {then}.")
    file.seek(0)
    return file
