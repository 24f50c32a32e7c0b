"""Kernel limits for local instances: one cgroup per instance, with a memory and a pids limit.

Both cgroup versions are supported, each controller wherever the host mounts it: v2 (one
hierarchy; `memory.max`, `pids.max`, OOM kills counted in `memory.events`) and v1 (a hierarchy
per controller, e.g. /sys/fs/cgroup/memory; `memory.limit_in_bytes`, `pids.max`, OOM kills in
`memory.oom_control`). An instance's cgroups are `<parent>/<kind>-<id>` in each hierarchy; the
parent is the same for every process of the portal (by default `/stockroom-<portal id>` at the
hierarchy's root, as Docker's cgroupfs driver does), so the web server, the worker and beat agree
on it whichever cgroup they themselves run in.

A cgroup is made afresh for each start of the server (so its OOM count is that run's) and
removed with the instance. Writing cgroups needs root.
"""

import errno
import os
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath

from ..errors import BackendError

CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Hierarchy:
    """Where one controller lives: its mount and version."""

    mount: Path
    version: int


class Cgroups:
    """The instance cgroups of one portal under `parent` (a path inside each hierarchy)."""

    def __init__(self, *, parent: str, mountinfo: Path = Path("/proc/self/mountinfo")):
        self.parent = PurePosixPath("/") / parent.lstrip("/")
        self.mountinfo = mountinfo

    # What the host offers ----------------------------------------------------------------

    @cached_property
    def hierarchies(self) -> dict[str, Hierarchy]:
        """Controller -> its hierarchy, for the controllers this host has (v1 mounts win, as the
        kernel gives a controller to one version only)."""
        found: dict[str, Hierarchy] = {}
        unified: Path | None = None
        try:
            lines = self.mountinfo.read_text().splitlines()
        except OSError:
            return found
        for line in lines:
            before, _, after = line.partition(" - ")
            fields, (fstype, _source, options) = before.split(), after.split()[:3]
            mount = Path(fields[4].replace("\\040", " "))
            if fstype == "cgroup":
                for controller in CONTROLLERS:
                    if controller in options.split(","):
                        found.setdefault(controller, Hierarchy(mount, 1))
            elif fstype == "cgroup2" and unified is None:
                unified = mount
        if unified is not None:
            try:
                offered = (unified / "cgroup.controllers").read_text().split()
            except OSError:
                offered = []
            for controller in CONTROLLERS:
                if controller in offered:
                    found.setdefault(controller, Hierarchy(unified, 2))
        return found

    def problem(self) -> str | None:
        """Why instance cgroups cannot be made here, or None."""
        missing = [controller for controller in CONTROLLERS if controller not in self.hierarchies]
        if missing:
            return f"this host has no {' or '.join(missing)} cgroup controller"
        if os.geteuid() != 0:
            return "only root may write cgroups"
        for hierarchy in set(self.hierarchies.values()):
            folder = self._folder(hierarchy)
            try:
                self._make_parent(hierarchy, folder)
            except OSError as exc:
                return f"cannot write {folder} ({exc.strerror})"
        return None

    def describe(self) -> str:
        versions = sorted({f"v{h.version} {c}" for c, h in self.hierarchies.items()})
        return f"{', '.join(versions)} under {self.parent}"

    # One instance ------------------------------------------------------------------------

    def prepare(self, name: str, *, memory: int, pids: int) -> list[Path]:
        """A fresh cgroup `name` with these limits in every hierarchy; returns the files a
        single-threaded process writes "0" to, to move itself in, before it execs the server.

        In v1 that is `tasks`: moving one's own only thread takes no global lock, where moving a
        process (`cgroup.procs`) waits for an RCU grace period, 10 ms and more on a busy host. v2
        has only `cgroup.procs`.
        """
        procs = []
        for hierarchy, controllers in self._by_hierarchy().items():
            folder = self._folder(hierarchy)
            self._make_parent(hierarchy, folder)
            path = folder / name
            _rmdir(path, wait=0)  # an empty one from the last run: its counts start again
            path.mkdir(exist_ok=True)
            if "memory" in controllers:
                self._limit_memory(hierarchy, path, memory)
            if "pids" in controllers:
                (path / "pids.max").write_text(str(pids))
            procs.append(path / ("tasks" if hierarchy.version == 1 else "cgroup.procs"))
        return procs

    def join(self, name: str, *, memory: int, pids: int) -> list[Path]:
        """The files to write "0" to, to join the instance's cgroup `name` (as `prepare` returns
        them), whose limits are left as its server's start set them; made with these limits if
        the host has lost it (a restart since)."""
        procs = []
        for hierarchy in self._by_hierarchy():
            path = self._folder(hierarchy) / name
            if not path.is_dir():
                return self.prepare(name, memory=memory, pids=pids)
            procs.append(path / ("tasks" if hierarchy.version == 1 else "cgroup.procs"))
        return procs

    def members(self, name: str) -> list[int]:
        """The processes in the instance's cgroup (as seen in the memory hierarchy)."""
        path = self._path("memory", name)
        try:
            return [int(pid) for pid in (path / "cgroup.procs").read_text().split()]
        except (OSError, BackendError):
            return []

    def oom_kills(self, name: str) -> int:
        """How many of the cgroup's processes the kernel killed for going over its memory limit
        since the server was last started."""
        try:
            path = self._path("memory", name)
            events = "memory.events" if self.hierarchies["memory"].version == 2 else "memory.oom_control"
            counts = dict(line.split() for line in (path / events).read_text().splitlines() if " " in line)
        except (OSError, BackendError, KeyError):
            return 0
        return int(counts.get("oom_kill", 0))

    def memory_limit(self, name: str) -> int | None:
        try:
            path = self._path("memory", name)
            limit = "memory.max" if self.hierarchies["memory"].version == 2 else "memory.limit_in_bytes"
            return int((path / limit).read_text())
        except (OSError, BackendError, KeyError, ValueError):
            return None

    def memory_in_use(self, name: str) -> int | None:
        """Bytes of anonymous memory the cgroup's processes use now: what a lower limit cannot
        take back (the page cache it can)."""
        try:
            path = self._path("memory", name)
            anon = "anon" if self.hierarchies["memory"].version == 2 else "total_rss"
            counts = dict(line.split() for line in (path / "memory.stat").read_text().splitlines() if " " in line)
            return int(counts[anon])
        except (OSError, BackendError, KeyError, ValueError):
            return None

    def set_memory_limit(self, name: str, memory: int) -> None:
        """Change the memory limit of the instance's running cgroup; its processes go on."""
        hierarchy = self.hierarchies["memory"]
        path = self._folder(hierarchy) / name
        if not path.is_dir():
            raise BackendError(f"The cgroup {name} is gone: the server is not running.")
        if hierarchy.version == 1 and (path / "memory.memsw.limit_in_bytes").exists():
            # v1 refuses a memory limit above the memory-and-swap one: that one goes first when growing.
            grows = memory > int((path / "memory.limit_in_bytes").read_text())
            order = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
            for file in order if grows else reversed(order):
                (path / file).write_text(str(memory))
            return
        self._limit_memory(hierarchy, path, memory)

    def remove(self, name: str) -> None:
        """Remove the instance's cgroups; their processes must be gone (or going: this waits a
        little for them to leave)."""
        for hierarchy in self._by_hierarchy():
            path = self._folder(hierarchy) / name
            if not _rmdir(path, wait=5):
                raise BackendError(f"Could not remove the cgroup {path}: processes are still in it.")

    def names(self) -> set[str]:
        """Every instance cgroup of this portal."""
        found: set[str] = set()
        for hierarchy in self._by_hierarchy():
            folder = self._folder(hierarchy)
            if folder.is_dir():
                found.update(entry.name for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False))
        return found

    # Paths and files ---------------------------------------------------------------------

    def _by_hierarchy(self) -> dict[Hierarchy, list[str]]:
        grouped: dict[Hierarchy, list[str]] = {}
        for controller, hierarchy in self.hierarchies.items():
            grouped.setdefault(hierarchy, []).append(controller)
        return grouped

    def _folder(self, hierarchy: Hierarchy) -> Path:
        return hierarchy.mount / self.parent.relative_to("/")

    def _path(self, controller: str, name: str) -> Path:
        hierarchy = self.hierarchies.get(controller)
        if hierarchy is None:
            raise BackendError(f"No {controller} cgroup controller.")
        return self._folder(hierarchy) / name

    def _make_parent(self, hierarchy: Hierarchy, folder: Path) -> None:
        if folder.is_dir():
            return
        folder.mkdir(parents=True, exist_ok=True)
        if hierarchy.version == 2:
            # v2 hands a controller down one level at a time, to cgroups without processes of
            # their own (the root is the exception): enable ours on every level down to `folder`.
            wanted = [c for c, h in self.hierarchies.items() if h == hierarchy]
            for level in [*reversed(folder.relative_to(hierarchy.mount).parents), folder.relative_to(hierarchy.mount)]:
                control = hierarchy.mount / level / "cgroup.subtree_control"
                enabled = control.read_text().split() if control.exists() else []
                missing = [c for c in wanted if c not in enabled]
                if missing:
                    control.write_text(" ".join(f"+{c}" for c in missing))

    @staticmethod
    def _limit_memory(hierarchy: Hierarchy, path: Path, memory: int) -> None:
        if hierarchy.version == 2:
            (path / "memory.max").write_text(str(memory))
            optional = {"memory.swap.max": "0", "memory.oom.group": "1"}  # no swap; one dies, all die
        else:
            (path / "memory.limit_in_bytes").write_text(str(memory))
            optional = {"memory.memsw.limit_in_bytes": str(memory)}  # memory and swap together: no swap
        for file, value in optional.items():
            try:
                (path / file).write_text(value)
            except OSError:  # this kernel does not account for it
                pass


def _rmdir(path: Path, *, wait: float) -> bool:
    """Remove an empty cgroup; True once it is gone. A cgroup whose processes have just been
    killed stays busy for a moment, so try for `wait` seconds."""
    deadline = time.monotonic() + wait
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                return False
        time.sleep(0.02)
