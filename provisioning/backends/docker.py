"""One container per instance, through the Docker SDK.

Containers are named `stockroom-<kind>-<id>` and labelled with the instance id, its kind and
this portal's id, so the portal can always find its own containers and tell them from
anyone else's. The engine says what goes in a container (`Engine.container`).

Everything of an instance's lives in `DOCKER_VOLUME_ROOT/<kind>/<id>`, a folder only root may
enter: the engine's files (read-only in the container), its first-start files (`init/`, emptied
once the server answers), and the folders the server writes: `disk/data` and `disk/tmp`, and `run`,
which holds the Unix socket the portal administers it through. The container runs as a uid of its
own (`uid_base` + the instance id), which owns those three folders and nothing else on the host,
with no capability, no way to gain privileges, a read-only root filesystem, and the engine's memory
and pids limits.

`disk/` is the instance's disk limit, as on the local backend: a filesystem of that size, in the
image `disk.img` loop-mounted there (see `disks`), or, where images cannot be mounted, a folder
whose size the reconciler watches. `data` and `tmp` exist only inside that filesystem, so a
container that Docker starts by itself before the portal mounted it (after the host restarted)
fails to start, instead of writing its data outside its limit; the portal's next start mounts it.

Snapshots, log archiving (point-in-time recovery) and restores run the engine's helper programs in a
container (see `containers`): the instance's own while it runs, or a helper container of the same
image, as the same uid, with the instance's `disk/` mounted, while it is stopped (a restore to a time
replays the log there too). `disk/` is root's, so the uid cannot put a symlink in place of `data` or
`tmp` (Docker follows one in a mount's source): a restore lets the uid's group write there only while
nothing but the helper runs as it, then gives it back to root and checks that `data` and `tmp` are
the uid's folders before the container starts.
"""

import dataclasses
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from django.conf import settings

from ..engines import Container, Endpoint, Layout, Replay, engines, get_engine
from . import files
from .base import BackendError, BaseBackend
from .containers import DockerBeside, docker_calls, exec_in
from .disks import Disks, fullness

if TYPE_CHECKING:
    from ..models import Instance

logger = logging.getLogger(__name__)

LABEL = "io.stockroom"
INIT = "init"  # the folder of first-start files, in the instance's folder
DISK = "disk"  # in the instance's folder: the filesystem of its disk limit, holding `data` and `tmp`
IMAGE = "disk.img"  # in the instance's folder: the image mounted at DISK
SERVER_DIRS = ("disk/data", "disk/tmp", "run")  # what the server writes, owned by its uid
WRITES_REFUSED = "writes-refused"  # in the instance's folder: the reconciler made its server refuse writes
NOT_ROOT = "The Docker backend must run as root: it gives each container's folders to the container's own uid."
GONE = "The instance's container is gone; delete the instance and create a new one."
HELPER = f"{LABEL}.helper"  # the label of a helper container (a restore's), beside the instance's labels
HELPER_DISK = PurePosixPath("/stockroom/disk")  # where a helper container has the instance's `disk/`
REPLACED = "-replaced"  # the name's suffix of a container put aside while it is made again from a new image
IMAGE_ID_SECONDS = 10.0  # how long an image name's id is taken as known (host_version is asked by pages)
# An image's id -> the version its server program names; an image name -> (when looked up, its id).
_image_versions: dict[tuple[str, str], str] = {}  # (image id, kind): one image may hold both kinds
_image_ids: dict[str, tuple[float, str]] = {}


def docker_proxies(*, port: int | None, container_addresses: set[str]) -> set[int]:
    """Root's docker-proxy processes that publish `port` for one of `container_addresses`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            owner = entry.stat().st_uid
        except OSError:
            continue
        if owner != 0 or Path(argv[0]).name != "docker-proxy":
            continue
        values = {name: value for name, value in zip(argv, argv[1:], strict=False) if name.startswith("-")}
        if values.get("-host-port") == str(port) and values.get("-container-ip") in container_addresses:
            found.add(int(entry.name))
    return found


class DockerBackend(BaseBackend):
    poll_interval = 0.1
    point_in_time = True

    def __init__(
        self,
        alias: str,
        *,
        base_url: str,
        volume_root: str,
        host_ip: str,
        images: dict[str, str],
        network_mode: str = "bridge",
        portal_id: str = "default",
        uid_base: int = 2_000_000_000,
    ):
        super().__init__(alias)
        if network_mode not in ("bridge", "host"):
            raise BackendError(f"DOCKER_NETWORK_MODE must be 'bridge' or 'host', not {network_mode!r}.")
        self.base_url = base_url
        self._docker = docker_calls("Docker", f"The Docker daemon at {base_url}")
        self.volume_root = Path(volume_root)
        self.host_ip = host_ip
        self.images = dict(images)
        self.network_mode = network_mode
        self.portal_id = portal_id
        self.uid_base = int(uid_base)

    @cached_property
    def disks(self) -> Disks:
        return Disks(self.volume_root / "_disks")

    @cached_property
    def no_disks(self) -> str | None:
        """Why the kernel does not enforce disk limits here, or None when each instance has a filesystem."""
        return self.disks.problem()

    # The client is made on first use, so a portal whose Docker daemon is down still starts.
    @cached_property
    def client(self) -> Any:
        import docker

        return self._docker("connect", docker.DockerClient, base_url=self.base_url, timeout=30)

    @property
    def public_host(self) -> str:
        return self.host_ip

    # Names and places -----------------------------------------------------------------

    def name(self, instance: "Instance") -> str:
        return f"stockroom-{instance.kind}-{instance.pk}"

    def labels(self, instance: "Instance") -> dict[str, str]:
        return {
            f"{LABEL}.managed": "true",
            f"{LABEL}.portal": self.portal_id,
            f"{LABEL}.instance": str(instance.pk),
            f"{LABEL}.kind": instance.kind,
        }

    def directory(self, instance: "Instance") -> Path:
        return Path(self.volume_root / instance.kind / str(instance.pk))

    def uid(self, instance: "Instance") -> int:
        """The container's uid and gid: the instance's own, so no other container and no host
        user shares them."""
        return self.uid_base + instance.pk

    def socket(self, instance: "Instance") -> Path:
        """The server's Unix socket, as the host sees it."""
        return self.directory(instance) / "run" / self.layout(instance).socket.name

    def layout(self, instance: "Instance") -> Layout:
        """Paths inside the container; the port it listens on there."""
        engine = get_engine(instance.kind)
        assert instance.port is not None, "only an instance that holds a port has a container"
        if self.network_mode == "host":
            return engine.container_layout(bind_address=settings.STOCKROOM_BIND_ADDRESS, port=instance.port)
        return engine.container_layout(bind_address="0.0.0.0", port=engine.container_port)

    # The contract ----------------------------------------------------------------------

    def create(self, instance: "Instance") -> None:
        self.destroy(instance)  # a clean slate, should the task run a second time
        image = self._image(instance.kind)
        layout = self.layout(instance)
        spec = get_engine(instance.kind).container(instance, layout)
        mounts = self._lay_out(instance, layout, spec)
        instance.mark("data_directory")
        container = self._new_container(instance, image, spec, mounts)
        self._docker("start the container", container.start)
        self._wait_for_login(instance, container)
        self._blank_init_files(instance, spec)

    def _new_container(self, instance: "Instance", image: str, spec: Container, mounts: list[Any]) -> Any:
        """The instance's container, made (not started) from `image` with `mounts`."""
        engine = get_engine(instance.kind)
        network = (
            {"network_mode": "host"}
            if self.network_mode == "host"
            else {"ports": {f"{engine.container_port}/tcp": (self.host_ip, instance.port)}}
        )
        uid = self.uid(instance)
        memory = engine.memory_limit(instance.options)
        return self._docker(
            "make the container",
            self.client.containers.create,
            image,
            spec.command,
            name=self.name(instance),
            labels=self.labels(instance),
            environment=spec.environment,
            mounts=mounts,
            user=f"{uid}:{uid}",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            read_only=True,
            pids_limit=engine.pids_limit,
            mem_limit=memory,
            memswap_limit=memory,  # no swap beyond the memory limit
            restart_policy={"Name": "unless-stopped"},
            **network,
        )

    def _blank_init_files(self, instance: "Instance", spec: Container) -> None:
        for name in spec.init_files:
            self._write(instance, self.directory(instance) / INIT / name, "")

    def _lay_out(self, instance: "Instance", layout: Layout, spec: Container) -> list[Any]:
        """Make the instance's folder and files on the host; return the container's bind mounts
        (mounts, not volumes: Docker makes a missing volume's folder, and fails a missing mount)."""
        if os.geteuid() != 0:
            raise BackendError(NOT_ROOT)
        directory, uid = self.directory(instance), self.uid(instance)
        directory.parent.mkdir(parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        directory.chmod(0o700)  # whatever the umask
        (directory / DISK).mkdir(mode=0o700)
        if not self.no_disks:
            size = instance.disk_limit
            self.disks.provide(directory / IMAGE, directory / DISK, size, usual=size in self.usual_disks())
            (directory / DISK / "lost+found").rmdir()  # root's, and e2fsck makes it again if it needs it
            (directory / DISK).chmod(0o700)
        for name in self._server_dirs(layout):
            (directory / name).mkdir(mode=0o700)
            os.chown(directory / name, uid, uid)
        for name, (_path, text) in spec.files.items():
            self._write(instance, directory / name, text)
        if spec.init_dir:
            (directory / INIT).mkdir()
            (directory / INIT).chmod(0o750)  # whatever the umask (the portal's is 077)
            os.chown(directory / INIT, 0, uid)
            for name, text in spec.init_files.items():
                self._write(instance, directory / INIT / name, text)
        return self._mounts(instance, layout, spec)

    @staticmethod
    def _server_dirs(layout: Layout) -> list[str]:
        """The folders of SERVER_DIRS the server has: one the engine keeps in the data folder is not."""
        places = {"disk/data": layout.data, "disk/tmp": layout.tmp, "run": layout.socket.parent}
        return [name for name in SERVER_DIRS if name == "disk/data" or places[name] != layout.data]

    def _mounts(self, instance: "Instance", layout: Layout, spec: Container) -> list[Any]:
        """The container's bind mounts of what `_lay_out` made."""
        from docker.types import Mount

        directory = self.directory(instance)
        places = {"disk/data": layout.data, "disk/tmp": layout.tmp, "run": layout.socket.parent}
        mounts = [Mount(str(places[name]), str(directory / name), type="bind") for name in self._server_dirs(layout)]
        for name, (path, _text) in spec.files.items():
            mounts.append(Mount(str(path), str(directory / name), type="bind", read_only=True))
        if spec.init_dir:
            mounts.append(Mount(str(spec.init_dir), str(directory / INIT), type="bind", read_only=True))
        return mounts

    def _write(self, instance: "Instance", path: Path, text: str) -> None:
        """Write a file the server reads (in place: a file bind-mount follows its inode)."""
        path.write_text(text)
        os.chown(path, 0, self.uid(instance))
        path.chmod(0o640)

    def stop(self, instance: "Instance") -> None:
        for container in self._own(instance):
            self._docker("stop the container", container.stop, timeout=30)

    def start(self, instance: "Instance") -> None:
        containers = self._own(instance)
        if not containers:
            raise BackendError(GONE)
        directory = self.directory(instance)
        self._mount_disk(directory)
        self._seal(instance)  # a restore cut short may have left `disk/` open to the uid's group
        (directory / WRITES_REFUSED).unlink(missing_ok=True)  # a new server accepts them
        spec = get_engine(instance.kind).container(instance, self.layout(instance))
        self._check_mounts(containers[0], spec)
        if not self._restored_unsettled(instance, spec):  # the options as they are now (pending ones applied)
            self._write_files(instance, spec, init=False)
        container = self._on_current_image(instance, containers)
        self._docker("start the container", container.start)
        self._wait_for_login(instance, container)
        self._settle(instance)  # after a restore whose first start failed, a later one's login did it

    def _on_current_image(self, instance: "Instance", containers: list[Any]) -> Any:
        """The stopped instance's container, made again with the same mounts if its image's name now
        names another image (a newer server): a container keeps the image it was made from. The old
        one is put aside until the new one is made, so a failure leaves it as it was."""
        name, replaced = self.name(instance), f"{self.name(instance)}{REPLACED}"
        named = {container.name: container for container in containers}
        current = named.get(name)
        if current is None:  # a start cut short put it aside, and made no new one
            current = named.get(replaced, containers[0])
            self._docker("rename the container back", current.rename, name)
        elif replaced in named:  # a start cut short made the new one, and left the old
            self._docker("remove the replaced container", named[replaced].remove, force=True)
        image = self._image(instance.kind)
        wanted = self._docker(f"inspect the image {image}", self.client.images.get, image).id
        if current.attrs.get("Image") == wanted:
            return current
        self._docker("put the old container aside", current.rename, replaced)
        try:
            spec = get_engine(instance.kind).container(instance, self.layout(instance))
            container = self._new_container(instance, image, spec, self._mounts(instance, self.layout(instance), spec))
        except BaseException:
            self._docker("rename the container back", current.rename, name)
            raise
        self._docker("remove the replaced container", current.remove, force=True)
        logger.info("Instance %s: container made again from %s (%s)", instance.pk, image, wanted)
        return container

    def _restored_unsettled(self, instance: "Instance", spec: Container) -> bool:
        """Whether a restore's first-start files are still there (its start failed): its files
        stay as the restore wrote them until a login settles them."""
        return any((self.directory(instance) / INIT / name).stat().st_size for name in spec.init_files)

    @staticmethod
    def _check_mounts(container: Any, spec: Container) -> None:
        """A container made before the engine had a file (its TLS files, say) lacks its mount: with
        a file it needs missing, say so rather than start a server that cannot find it."""
        mounted = {mount.get("Destination") for mount in container.attrs.get("Mounts") or ()}
        missing = [str(path) for path, text in spec.files.values() if text and str(path) not in mounted]
        if missing:
            raise BackendError(
                f"The container was made without {', '.join(missing)}; restore a snapshot into a new "
                "instance to use this option."
            )

    def reload_tls(self, instance: "Instance") -> bool:
        engine, directory = get_engine(instance.kind), self.directory(instance)
        for name, text in engine.tls_files(instance).items():
            self._write(instance, directory / name, text)
        try:
            with self.admin(instance) as admin:
                return engine.reload_tls(instance, admin=admin)
        except BackendError:  # not running: it reads them when it starts
            return False

    def _settle(self, instance: "Instance") -> None:
        """The container's usual files again, and its first-start files emptied: once a login works,
        the server has made its accounts."""
        spec = get_engine(instance.kind).container(instance, self.layout(instance))
        self._write_files(instance, spec, init=False)
        self._blank_init_files(instance, spec)

    def _mount_disk(self, directory: Path) -> None:
        if (directory / IMAGE).exists() and not os.path.ismount(directory / DISK):  # the host restarted
            self.disks.mount(directory / IMAGE, directory / DISK)

    @contextmanager
    def _beside(self, instance: "Instance") -> Iterator[DockerBeside]:
        """Programs in the instance's own running container, as its uid; the portal's clients
        through its checked socket."""
        containers = self._own(instance)
        if not containers:
            raise BackendError(GONE)
        with self.admin(instance) as admin:
            execute = partial(self._exec, containers[0], user=self._user(instance))
            yield DockerBeside(layout=self.layout(instance), endpoint=admin, execute=execute)

    def restore(self, instance: "Instance", snapshot: IO[bytes], replay: Replay | None = None) -> None:
        engine = get_engine(instance.kind)
        containers = self._own(instance)
        if not containers:
            raise BackendError(GONE)
        directory, layout = self.directory(instance), self.layout(instance)
        self.stop(instance)
        self._mount_disk(directory)
        with self._helper(instance) as helper:
            # The helper has `disk/` where the server has `data` and `tmp` inside it.
            data = HELPER_DISK / "data"
            tmp = data if layout.tmp == layout.data else HELPER_DISK / "tmp"
            execute = partial(self._exec, helper, user=self._user(instance))
            beside = DockerBeside(
                layout=dataclasses.replace(layout, data=data, tmp=tmp), endpoint=None, execute=execute
            )
            engine.restore(instance, beside, snapshot, replay)
        (directory / WRITES_REFUSED).unlink(missing_ok=True)  # a new server accepts them
        # As at the first start: the accounts are made again from the instance's own credentials.
        self._write_files(instance, engine.container_restored(instance, layout))
        self._docker("start the container", containers[0].start)
        self._wait_for_login(instance, containers[0])
        self._settle(instance)

    def _write_files(self, instance: "Instance", spec: Container, *, init: bool = True) -> None:
        """The container's files (and first-start files) again, in place: a bind mount follows an inode."""
        directory = self.directory(instance)
        for name, (_path, text) in spec.files.items():
            self._write(instance, directory / name, text)
        for name, text in spec.init_files.items() if init else ():
            self._write(instance, directory / INIT / name, text)

    def _user(self, instance: "Instance") -> str:
        return f"{self.uid(instance)}:{self.uid(instance)}"

    def _exec(self, container: Any, argv: Any, **kwargs: Any) -> None:
        exec_in(self.client, container, argv, timeout=settings.STOCKROOM_TASK_TIME_LIMIT, **kwargs)

    @contextmanager
    def _helper(self, instance: "Instance") -> Iterator[Any]:
        """A container of the instance's image that runs nothing but what is executed in it, as the
        instance's uid, with its limits, no network, and its `disk/` mounted, which the uid's group
        may write in meanwhile (to put a new `data` in place of the old)."""
        from docker.types import Mount

        for container in self._own(instance, helpers=True):
            if HELPER in container.labels:  # left by a restore cut short
                self._docker("remove a helper container", container.remove, force=True)
        engine, uid, disk = get_engine(instance.kind), self.uid(instance), self.directory(instance) / DISK
        os.chown(disk, 0, uid)
        disk.chmod(0o770)
        try:
            memory = engine.memory_limit(instance.options)
            helper = self._docker(
                "start a helper container",
                self.client.containers.run,
                self._image(instance.kind),
                ["infinity"],
                entrypoint=["sleep"],
                name=f"{self.name(instance)}-helper",
                labels={**self.labels(instance), HELPER: "true"},
                mounts=[Mount(str(HELPER_DISK), str(disk), type="bind")],
                tmpfs={"/tmp": "size=64m,mode=1777"},
                user=self._user(instance),
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                network_mode="none",
                pids_limit=engine.pids_limit,
                mem_limit=memory,
                memswap_limit=memory,
                detach=True,
            )
            try:
                yield helper
            finally:
                self._docker("remove a helper container", helper.remove, force=True)
        finally:
            self._seal(instance)

    def _seal(self, instance: "Instance") -> None:
        """`disk/` root's alone again, and `data` and `tmp` in it the uid's folders, not symlinks: the
        container's mounts are made from those paths, and Docker follows a symlink there."""
        disk, uid = self.directory(instance) / DISK, self.uid(instance)
        if not disk.is_dir():
            return
        os.chown(disk, 0, 0)
        disk.chmod(0o700)
        for name in SERVER_DIRS:
            path = self.directory(instance) / name
            if name.startswith(f"{DISK}/") and path.name != "data" and not os.path.lexists(path):
                continue  # an engine that keeps it in the data folder has none
            try:
                status = os.lstat(path)
            except FileNotFoundError:
                raise BackendError(f"{path} is missing; the container cannot start.") from None
            if not stat.S_ISDIR(status.st_mode) or status.st_uid != uid:
                raise BackendError(f"{path} is not the server's folder; the container is not started.")

    def set_password(self, instance: "Instance", password: str) -> None:
        directory = self.directory(instance)
        with self.admin(instance) as admin:
            get_engine(instance.kind).set_password(
                instance, password, admin=admin, write=lambda name, text: self._write(instance, directory / name, text)
            )

    def server_version(self, instance: "Instance") -> str:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).server_version(instance, admin)

    def host_version(self, kind: str) -> str:
        engine = get_engine(kind)
        image = self.images.get(kind) or engine.image
        looked_up, image_id = _image_ids.get(image, (0.0, ""))
        if time.monotonic() - looked_up > IMAGE_ID_SECONDS:
            image_id = self._docker(f"inspect the image {image}", self.client.images.get, image).id
            _image_ids[image] = (time.monotonic(), image_id)
        if (image_id, kind) not in _image_versions:
            # Once per image: its server program, run with nothing but --version.
            output = self._docker(
                f"run {engine.version_program} --version in {image}",
                self.client.containers.run,
                image_id,
                ["--version"],
                entrypoint=[engine.version_program],
                labels={f"{LABEL}.managed": "true", f"{LABEL}.portal": self.portal_id},
                user="65534:65534",
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                read_only=True,
                network_mode="none",
                remove=True,
            )
            _image_versions[image_id, kind] = engine.program_version(bytes(output).decode(errors="replace"))
        return _image_versions[image_id, kind]

    def memory(self, instance: "Instance") -> tuple[int | None, int | None]:
        container = self._running(instance)
        stats = self._docker("read the container's memory", container.stats, stream=False).get("memory_stats", {})
        in_use = stats.get("stats", {}).get("anon", stats.get("usage"))
        return int(container.attrs["HostConfig"]["Memory"] or 0) or None, in_use

    def set_memory_limit(self, instance: "Instance", memory: int) -> None:
        container = self._running(instance)
        self._docker("change the memory limit", container.update, mem_limit=memory, memswap_limit=memory)

    def keep_config(self, instance: "Instance") -> None:
        # Docker restarts a container that died (unless-stopped) with the files it finds.
        spec = get_engine(instance.kind).container(instance, self.layout(instance))
        if not self._restored_unsettled(instance, spec):
            self._write_files(instance, spec, init=False)

    def _running(self, instance: "Instance") -> Any:
        containers = self._own(instance)
        if not containers:
            raise BackendError(GONE)
        return containers[0]

    def client_connections(self, instance: "Instance") -> int:
        with self.admin(instance) as admin:
            return get_engine(instance.kind).client_connections(instance, admin=admin)

    @contextmanager
    def admin(self, instance: "Instance") -> Iterator[Endpoint]:
        """Where the portal administers the server: its Unix socket, reached through a descriptor
        checked to be a socket of the container's uid (which may put a symlink in its place)."""
        assert instance.port is not None, "only an instance that holds a port has a server"
        with files.unix_socket(self.socket(instance), owner=self.uid(instance)) as socket:
            if socket is None:
                raise BackendError("The server has no socket: it is not running.")
            yield Endpoint(self.probe_host, instance.port, socket=socket)

    def enforce_disk_limit(self, instance: "Instance") -> str | None:
        directory = self.directory(instance)
        return fullness(
            directory / DISK,
            instance.disk_limit,
            refusing=(directory / WRITES_REFUSED).exists(),
            refuse=lambda refuse: self._refuse_writes(instance, refuse=refuse),
        )

    def _refuse_writes(self, instance: "Instance", *, refuse: bool) -> None:
        with self.admin(instance) as admin:
            get_engine(instance.kind).refuse_writes(instance, refuse, admin=admin)
        marker = self.directory(instance) / WRITES_REFUSED
        if refuse:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    def instance_pids(self, instance: "Instance") -> set[int]:
        """With host networking, the container's processes; on a bridge, the docker-proxy (a root
        process of dockerd's) that publishes the container's port on the host."""
        pids: set[int] = set()
        for container in self._own(instance):
            if self.network_mode == "host":
                try:
                    top = container.top()  # host pids; a container that is not running has none
                except Exception:  # noqa: BLE001 - the docker SDK raises many kinds
                    continue
                column = top["Titles"].index("PID")
                pids |= {int(row[column]) for row in top.get("Processes") or ()}
            else:
                networks = container.attrs["NetworkSettings"]["Networks"].values()
                addresses = {network["IPAddress"] for network in networks if network.get("IPAddress")}
                pids |= docker_proxies(port=instance.port, container_addresses=addresses)
        return pids

    @property
    def probe_host(self) -> str:
        return settings.STOCKROOM_BIND_ADDRESS if self.network_mode == "host" else self.host_ip

    def destroy(self, instance: "Instance") -> None:
        for container in self._own(instance, helpers=True):
            self.remove_container(container)
        self._remove_data(self.directory(instance))

    def remove_container(self, container: Any) -> None:
        """Remove a container of this portal's and its data directory."""
        self._docker("remove the container", container.remove, force=True, v=True)
        kind, instance = container.labels.get(f"{LABEL}.kind", ""), container.labels.get(f"{LABEL}.instance", "")
        if kind in engines() and instance.isdigit():
            self._remove_data(self.volume_root / kind / instance)

    def _remove_data(self, directory: Path) -> None:
        self.disks.unmount(directory / DISK)
        shutil.rmtree(directory, ignore_errors=True)
        if directory.exists():
            raise BackendError(f"Could not remove {directory}.")

    def check(self) -> str:
        version = self._docker("answer a ping", self.client.version)
        found = f"Docker {version.get('Version', '?')} at {self.base_url}."
        if self.no_disks:
            return f"{found} The reconciler enforces disk limits, not the kernel: {self.no_disks}."
        return f"{found} Each container's data is a loop-mounted filesystem of its disk limit."

    def forget_ready(self) -> None:
        self.disks.forget_ready()

    def orphans(self, known_ids: set[int]) -> dict[str, str]:
        found = {}
        for container in self._containers({}):
            instance = container.labels.get(f"{LABEL}.instance", "")
            if not instance.isdigit() or int(instance) not in known_ids:
                kind = container.labels.get(f"{LABEL}.kind", "?")
                found[container.name] = f"Container of {kind} instance {instance or '?'}, {container.status}."
        return found

    def remove_orphan(self, key: str) -> None:
        for container in self._containers({}):
            if container.name == key:
                self.remove_container(container)

    # Helpers ---------------------------------------------------------------------------

    def _own(self, instance: "Instance", *, helpers: bool = False) -> list[Any]:
        """The instance's container (and, with `helpers`, a restore's helper container too)."""
        found = self._containers({f"{LABEL}.instance": str(instance.pk), f"{LABEL}.kind": instance.kind})
        return [container for container in found if helpers or HELPER not in container.labels]

    def _containers(self, labels: dict[str, str]) -> list[Any]:
        wanted = {f"{LABEL}.managed": "true", f"{LABEL}.portal": self.portal_id, **labels}
        filters = {"label": [f"{key}={value}" for key, value in wanted.items()]}
        found: list[Any] = self._docker("list containers", self.client.containers.list, all=True, filters=filters)
        return found

    def _image(self, kind: str) -> str:
        import docker.errors

        image = self.images.get(kind) or get_engine(kind).image
        try:
            self._docker(f"inspect the image {image}", self.client.images.get, image)
        except BackendError as exc:
            if not isinstance(exc.__cause__, docker.errors.ImageNotFound):
                raise
            logger.info("Pulling %s", image)
            try:
                self.client.images.pull(image)
            except Exception as pull_error:  # any failure means the image is unusable
                raise BackendError(
                    f"The image {image} is not available and could not be pulled "
                    f"({type(pull_error).__name__}). Ask an operator to provide it."
                ) from pull_error
        return image

    def _wait_for_login(self, instance: "Instance", container: Any) -> None:
        def exited() -> bool:
            self._docker("inspect the container", container.reload)
            return bool(container.attrs["State"]["Status"] in ("exited", "dead", "restarting"))

        self.wait_for_login(instance, exited=exited, log_tail=lambda: self._log_tail(container))

    def _log_tail(self, container: Any, lines: int = 3) -> str:
        try:
            text = container.logs(tail=lines).decode(errors="replace").strip()
        except Exception:  # noqa: BLE001 - a missing log must not hide the real error
            return ""
        return f"Container log: {' | '.join(text.splitlines())}" if text else "The container log is empty."
