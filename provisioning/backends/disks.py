"""A disk limit the kernel enforces: each local instance's `server/` folder is an ext4 filesystem of
its own, in a sparse image file loop-mounted there (nosuid, nodev, noexec).

Formatting costs tens of milliseconds, so the usual sizes (the defaults) are formatted once, into
a template; a new image is a sparse copy of it (a millisecond: only the few blocks of metadata are
copied). Setting up a loop device waits for the kernel to drain its queue (milliseconds more), so a
few filesystems of each usual size are kept ready, mounted in `ready/<size>/`, and a new
instance's is moved into place (MS_MOVE) and made again behind it. Other sizes are formatted in
place. Loop devices are set up with ioctls rather than
mount(8), and come loose by themselves (autoclear) when their filesystem is unmounted. All of it
needs root.

Where images cannot be mounted, `fullness` is how the reconciler enforces a limit instead.
"""

import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from ..errors import BackendError
from . import processes

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_SET_FD, LOOP_SET_STATUS64 = 0x4C00, 0x4C04
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")  # struct loop_info64
LOOP_CONFIG = struct.Struct(f"=II{LOOP_INFO64.size}s64x")  # struct loop_config
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_MOVE, MS_PRIVATE = 2, 4, 8, 4096, 8192, 1 << 18
MNT_DETACH = 2
READY = 2  # filesystems kept ready per usual size
# No journal, no reserved blocks. On a sparse file mkfs discards (punches holes), so the inode
# tables read as zeros and are marked so without a byte written: the template stays a few hundred
# KiB, and a mounted copy has no inode tables to zero in the background.
MKFS = ["mkfs.ext4", "-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "lazy_itable_init=0,discard"]

MiB = 2**20
FULL_MARGIN = 1 * MiB  # a filesystem with no more room than this (or 2 %) is full: writes fail
DISK_FULL = "Its disk is full"  # how every message of fullness() begins

_libc = ctypes.CDLL(None, use_errno=True)
logger = logging.getLogger(__name__)


class Disks:
    """Filesystem images of any size, made from templates kept in `templates`."""

    def __init__(self, templates: Path):
        self.templates = templates
        self.ready = templates / "ready"  # <size>/<name>: a mounted filesystem (a private mount)
        self.ready_images = templates / "ready-images"  # <size>/<name>.img: its image, apart from the mounts
        self._making: list[threading.Thread] = []

    def problem(self) -> str | None:
        """Why images cannot be loop-mounted here, or None (tried once for real)."""
        if os.geteuid() != 0:
            return "only root may mount filesystems"
        if not Path("/dev/loop-control").exists():
            return "this host has no loop devices"
        self.templates.parent.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(dir=self.templates.parent, prefix=".disk-check-") as trial:
                image, target = Path(trial) / "disk.img", Path(trial) / "mnt"
                target.mkdir()
                _format(image, 8 * 2**20)
                self.mount(image, target)
                self.unmount(target)
        except (OSError, BackendError) as exc:
            return f"a loop-mounted image could not be made ({exc})"
        return None

    def provide(self, image: Path, target: Path, size: int, *, usual: bool) -> None:
        """A filesystem of `size` bytes mounted at `target`, its image at `image` (which must not
        exist yet). Of a `usual` size: one kept ready if there is one, else a copy of the size's
        template, and then another is made ready; of another size, one formatted in place."""
        if not usual:
            _format(image, size)
            self.mount(image, target)
            return
        if not self._take_ready(image, target, size):
            self.make(image, size)
            self.mount(image, target)
        maker = threading.Thread(target=self._make_ready, args=(size,), name="disk-ready", daemon=True)
        maker.start()
        self._making = [*(thread for thread in self._making if thread.is_alive()), maker]

    def make(self, image: Path, size: int) -> None:
        """A new image of `size` bytes at `image` (a file that must not exist yet)."""
        _sparse_copy(self._template(size), image)

    def mount(self, image: Path, target: Path) -> None:
        """Mount the image at `target`, through a loop device that goes when it is unmounted."""
        device, loop = _attach(image)
        try:  # the device stays while it is open; then the mount holds it (or, if none, it goes)
            flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
            if _libc.mount(str(device).encode(), str(target).encode(), b"ext4", flags, None):
                error = os.strerror(ctypes.get_errno())
                raise BackendError(f"Could not mount {image} at {target}: {error}.")
        finally:
            os.close(loop)

    def forget_ready(self) -> None:
        """Unmount and remove every filesystem kept ready (before the instances folder goes)."""
        for maker in self._making:
            maker.join()
        if not self.ready.is_dir():
            return
        for mountpoint in self.ready.glob("*/*"):
            if mountpoint.is_dir():
                self.unmount(mountpoint)
        while _mounted(self.ready):  # the private mount of ready/ itself
            self.unmount(self.ready, force=True)
        shutil.rmtree(self.ready)
        shutil.rmtree(self.ready_images, ignore_errors=True)

    # Filesystems kept ready ----------------------------------------------------------------

    def _take_ready(self, image: Path, target: Path, size: int) -> bool:
        folder = self.ready / str(size)
        if not folder.is_dir():
            return False
        with open(self.ready / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for mountpoint in sorted(folder.iterdir()):
                if not os.path.ismount(mountpoint):
                    continue  # still being made
                if _libc.mount(str(mountpoint).encode(), str(target).encode(), None, MS_MOVE, None):
                    return False  # the next create makes its own; this one stays ready
                os.rename(self.ready_images / str(size) / f"{mountpoint.name}.img", image)
                mountpoint.rmdir()
                return True
        return False

    def _make_ready(self, size: int) -> None:
        folder, images = self.ready / str(size), self.ready_images / str(size)
        try:
            self._private_folder()
            folder.mkdir(mode=0o700, exist_ok=True)
            images.mkdir(mode=0o700, parents=True, exist_ok=True)
            for _ in range(READY - sum(map(os.path.ismount, folder.iterdir()))):
                name = secrets.token_hex(8)
                self.make(images / f"{name}.img", size)
                (folder / name).mkdir(mode=0o700)
                self.mount(images / f"{name}.img", folder / name)
        except (OSError, BackendError):  # the next create makes its own
            logger.exception("Could not make a %s-byte filesystem ready", size)

    def _private_folder(self) -> None:
        """`ready/` as a private mount of its own: a mount may be moved only out of a parent that
        does not share its mounts with others (on systemd hosts, / does)."""
        self.ready.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.templates / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _mounted(self.ready):
                return
            path = str(self.ready).encode()
            if _libc.mount(path, path, None, MS_BIND, None) or _libc.mount(None, path, None, MS_PRIVATE, None):
                raise OSError(ctypes.get_errno(), f"could not make {self.ready} a private mount")

    def unmount(self, target: Path, *, force: bool = False) -> None:
        """Unmount the filesystem at `target`, if one is mounted there (`force`: whatever is)."""
        if not force and not os.path.ismount(target):
            return
        if _libc.umount2(str(target).encode(), 0):
            error = ctypes.get_errno()
            if error != errno.EBUSY or _libc.umount2(str(target).encode(), MNT_DETACH):
                raise BackendError(f"Could not unmount {target}: {os.strerror(ctypes.get_errno() or error)}.")

    @staticmethod
    def usage(target: Path) -> tuple[int, int]:
        """(bytes used, bytes in all) of the filesystem at `target`."""
        status = os.statvfs(target)
        return (status.f_blocks - status.f_bavail) * status.f_frsize, status.f_blocks * status.f_frsize

    def _template(self, size: int) -> Path:
        recipe = hashlib.sha256(" ".join(MKFS).encode()).hexdigest()[:8]
        template = self.templates / f"ext4-{size}-{recipe}.img"
        if template.exists():
            return template
        self.templates.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(self.templates / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not template.exists():
                building = template.with_suffix(".building")
                building.unlink(missing_ok=True)
                try:
                    _format(building, size)
                except BackendError:
                    building.unlink(missing_ok=True)
                    raise
                building.rename(template)
        return template


def fullness(folder: Path, limit: int, *, refusing: bool, refuse: Callable[[bool], None]) -> str | None:
    """A status message beginning with DISK_FULL if the instance whose data is in `folder` has
    reached its limit of `limit` bytes, else None.

    Where `folder` is a filesystem of its own, the kernel stops writes at the limit: this only
    looks. Elsewhere it calls `refuse(True)` when the data reaches the limit (the server is to refuse
    writes; reads still work) and `refuse(False)` once it has room again; `refusing` is what it
    said last.
    """
    if os.path.ismount(folder):
        used, size = Disks.usage(folder)
        if size - used > max(FULL_MARGIN, size // 50):
            return None
        return f"{DISK_FULL} ({size_text(used)} used of {size_text(limit)}): writes fail; reads still work."
    used = bytes_under(folder)
    full = used >= limit
    if full != refusing:
        refuse(full)
    if not full:
        return None
    return (
        f"{DISK_FULL} ({size_text(used)} used of {size_text(limit)}): the server refuses writes until it has room; "
        "reads still work."
    )


def size_text(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size < 1024 * MiB else f"{size / (1024 * MiB):.2f} GiB"


def bytes_under(folder: Path) -> int:
    """Disk space taken by everything in `folder` (what `du` says); follows no symlink."""
    total = 0
    for parent, names, file_names in os.walk(folder):
        for name in (*names, *file_names):
            with suppress(FileNotFoundError):
                total += os.lstat(os.path.join(parent, name)).st_blocks * 512
    return total


def _format(image: Path, size: int) -> None:
    """A new sparse file of `size` bytes at `image`, holding an empty filesystem."""
    descriptor = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.ftruncate(descriptor, size)
    os.close(descriptor)
    result = subprocess.run([*MKFS, str(image)], capture_output=True, text=True, env=processes.ENVIRONMENT)
    if result.returncode:
        raise BackendError(f"mkfs.ext4 failed for a {size}-byte image: {result.stderr.strip()}")


def _mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, a bind mount of a folder onto itself included
    (which os.path.ismount does not see: the same filesystem on both sides)."""
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4].replace("\\040", " ") == str(path) for line in table)


def _sparse_copy(source: Path, target: Path) -> None:
    """Copy only the blocks that hold data; the holes stay holes."""
    reader = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        writer = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            offset = 0
            while True:
                try:
                    start = os.lseek(reader, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno == errno.ENXIO:  # no data after `offset`
                        break
                    raise
                end = os.lseek(reader, start, os.SEEK_HOLE)
                while start < end:
                    start += os.copy_file_range(reader, writer, end - start, start, start)
                offset = end
            os.ftruncate(writer, os.fstat(reader).st_size)
        finally:
            os.close(writer)
    finally:
        os.close(reader)


def _attach(image: Path) -> tuple[Path, int]:
    """A free loop device backed by `image`, and an open descriptor of it; the device comes loose
    when its last user lets go."""
    backing = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(20):  # another process may take the free device first
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = Path(f"/dev/loop{number}")
            loop = os.open(device, os.O_RDWR | os.O_CLOEXEC)
            info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, b"", b"", b"", 0, 0)
            try:
                try:
                    fcntl.ioctl(loop, LOOP_CONFIGURE, LOOP_CONFIG.pack(backing, 0, info))
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                        raise
                    # Before Linux 5.8: the same in two steps.
                    fcntl.ioctl(loop, LOOP_SET_FD, backing)
                    fcntl.ioctl(loop, LOOP_SET_STATUS64, info)
            except OSError as exc:
                os.close(loop)
                if exc.errno == errno.EBUSY:
                    continue
                raise
            return device, loop
        raise BackendError("No free loop device.")
    finally:
        os.close(control)
        os.close(backing)
