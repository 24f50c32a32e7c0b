"""A real three-node Docker Swarm on this one machine, for the tests of issue 18.

`with swarm(image, image_source) as cluster:` builds, as root:

- a Linux bridge `srswarm-<slot>` in the root network namespace, at 10.213.<slot>.1/24;
- two network namespaces `srswarm-<slot>-w1` and `-w2`, each joined to the bridge by a veth pair,
  at .2 and .3 of that /24, loopback up, default route via .1;
- the manager's dockerd in the root namespace and one dockerd in each namespace, every one with its
  own data-root, exec-root, pid file, socket and cgroup parent (never scripts/ensure-docker's
  /run/stockroom-docker*), all with --bridge=none and no iptables rules;
- a swarm: `swarm init` on the manager at .1, the two workers joined and labelled
  `stockroom.role=db`;
- the image `image`, copied from the daemon at `image_source` with `docker save | docker load`.

and yields the `Swarm`. Afterwards everything is taken down in reverse, even when the body raised:
the nodes leave the swarm, each dockerd is stopped by its PID, what the daemons left mounted is
unmounted, and the namespaces, veths, bridge, cgroups and directories are removed.

Runs from several checkouts at once do not meet: each takes a free slot (a lock on
/run/srswarm-<slot>.lock, held for the whole run), and every name, address and path carries the
slot. Before a run claims its slot, `sweep()` clears every slot that no run holds of what a killed
run left there.

Workers' daemons start under `nsenter --net=…`, not `ip netns exec`: the latter remounts /sys, and
dockerd then stops with "Devices cgroup isn't mounted" on these cgroup-v1 machines.
"""

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import docker

PREFIX = "srswarm"
SLOTS = range(64)
DB_LABEL = "stockroom.role"
RUN_ROOT = Path("/run")  # exec-roots, sockets, pid files, locks
DATA_ROOT = Path("/var/tmp")  # data-roots (images and containers) and daemon logs
CGROUP_ROOT = Path("/sys/fs/cgroup")
SWARM_PORT = 2377
HEARTBEAT_NS = 10**9
START_TIMEOUT = 60
STOP_TIMEOUT = 20


class SwarmError(RuntimeError):
    """The cluster could not be built; the message says which step and why."""


@dataclass
class Node:
    """One dockerd of the cluster: the manager (netns None: the root namespace) or a worker."""

    name: str
    address: str
    netns: str | None
    run_dir: Path
    data_dir: Path
    cgroup_parent: str
    pid: int | None = None
    node_id: str = ""
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def log(self) -> Path:
        return self.data_dir.parent / f"{self.name}.log"

    def client(self, timeout: int = 30) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, timeout=timeout)

    def argv(self) -> list[str]:
        daemon = ["dockerd", "--data-root", str(self.data_dir), "--exec-root", str(self.run_dir / "exec"),
                  "--pidfile", str(self.pidfile), "--host", self.url, "--cgroup-parent", self.cgroup_parent,
                  "--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false",
                  "--ip-masq=false"]  # fmt: skip
        if self.netns is None:
            return daemon
        return ["nsenter", f"--net=/run/netns/{self.netns}", *daemon]


class Swarm:
    """The cluster of one slot: what `swarm()` yields. `setup()` builds it, `teardown()` takes
    down whatever of it exists (idempotent, and safe after a set-up that stopped half way)."""

    def __init__(self, slot: int):
        self.slot = slot
        self.name = f"{PREFIX}-{slot}"
        self.network = ipaddress.IPv4Network(f"10.213.{slot}.0/24")
        self.bridge = self.name
        # A swarm node joins its ingress network through a bridge named docker_gwbridge, which
        # dockerd creates (172.18.0.0/16) unless one exists. The manager's would be in the root
        # namespace, shared with other runs and left behind: it gets one of ours instead.
        self.gateway_bridge = f"{self.name}-gw"
        self.gateway_network = ipaddress.IPv4Network(f"10.214.{slot}.0/24")
        # Two managers in one namespace cannot share the VXLAN port (4789 by default).
        self.data_path_port = 4800 + slot
        self.run_dir = RUN_ROOT / self.name
        self.data_dir = DATA_ROOT / self.name
        hosts = list(self.network.hosts())

        def node(name: str, address: ipaddress.IPv4Address, netns: str | None) -> Node:
            return Node(name=name, address=str(address), netns=netns, run_dir=self.run_dir / name,
                        data_dir=self.data_dir / name, cgroup_parent=f"/{self.name}-{name}")  # fmt: skip

        self.manager = node("manager", hosts[0], None)
        self.workers = [node(f"w{i}", hosts[i], f"{self.name}-w{i}") for i in (1, 2)]

    @property
    def nodes(self) -> list[Node]:
        return [self.manager, *self.workers]

    def veth(self, worker: Node) -> str:
        """The root-namespace end of a worker's veth pair (the other end is eth0 in its namespace)."""
        return worker.netns or ""

    # Set-up

    def setup(self, image: str | None = None, image_source: str | None = None) -> None:
        self.make_network()
        for node in self.nodes:
            self.start_daemon(node)
        self.form_swarm()
        if image:
            self.load_image(image, image_source or "unix:///var/run/docker.sock")

    def make_network(self) -> None:
        prefix = self.network.prefixlen
        gateway = self.manager.address
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{gateway}/{prefix}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        # Nothing the namespaces send is routed on beyond the bridge (the host may forward for others).
        Path(f"/proc/sys/net/ipv4/conf/{self.bridge}/forwarding").write_text("0")
        for worker in self.workers:
            netns, veth = worker.netns or "", self.veth(worker)
            ip("netns", "add", netns)
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
            ip("link", "set", veth, "master", self.bridge, "up")
            inside = ["-n", netns]
            ip(*inside, "link", "set", "lo", "up")
            ip(*inside, "addr", "add", f"{worker.address}/{prefix}", "dev", "eth0")
            ip(*inside, "link", "set", "eth0", "up")
            ip(*inside, "route", "add", "default", "via", gateway)

    def start_daemon(self, node: Node) -> None:
        node.run_dir.mkdir(parents=True, exist_ok=True)
        node.data_dir.mkdir(parents=True, exist_ok=True)
        with node.log.open("ab") as log:
            # Swarm tasks use the local image: no registry is asked (none is reachable from here).
            node.process = subprocess.Popen(
                node.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=os.environ | {"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}, start_new_session=True,
            )  # fmt: skip
        node.pid = node.process.pid  # nsenter execs dockerd: the same PID
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if node.process.poll() is not None:
                raise SwarmError(f"dockerd of {node.name} exited ({node.process.returncode}): {tail(node.log)}")
            with (
                contextlib.suppress(docker.errors.DockerException),
                contextlib.closing(node.client(timeout=2)) as client,
            ):
                if client.ping():
                    return
            if time.monotonic() > deadline:
                raise SwarmError(f"dockerd of {node.name} did not answer in {START_TIMEOUT} s: {tail(node.log)}")
            time.sleep(0.2)

    def form_swarm(self) -> None:
        with contextlib.closing(self.manager.client()) as manager:
            address = self.manager.address
            manager.networks.create(
                "docker_gwbridge", driver="bridge",
                ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=str(self.gateway_network))]),
                options={"com.docker.network.bridge.name": self.gateway_bridge,
                         "com.docker.network.bridge.enable_icc": "false",
                         "com.docker.network.bridge.enable_ip_masquerade": "false"},
            )  # fmt: skip
            # A node that misses its heartbeats is down after a few of them: 1 s, not 5, so that a cut
            # worker is seen within two reconcile periods (the README's operator's guide says the same).
            self.manager.node_id = manager.swarm.init(
                advertise_addr=address, listen_addr=f"{address}:{SWARM_PORT}", data_path_port=self.data_path_port,
                dispatcher_heartbeat_period=HEARTBEAT_NS,
            )  # fmt: skip
            manager.swarm.reload()
            token = manager.swarm.attrs["JoinTokens"]["Worker"]
            for worker in self.workers:
                with contextlib.closing(worker.client()) as client:
                    client.swarm.join(
                        remote_addrs=[f"{address}:{SWARM_PORT}"],
                        join_token=token,
                        advertise_addr=worker.address,
                        listen_addr=f"{worker.address}:{SWARM_PORT}",
                    )
                    worker.node_id = client.info()["Swarm"]["NodeID"]
            deadline = time.monotonic() + START_TIMEOUT
            while not all(n.attrs["Status"]["State"] == "ready" for n in manager.nodes.list()):
                if time.monotonic() > deadline:
                    raise SwarmError(f"nodes not ready: {[n.attrs['Status'] for n in manager.nodes.list()]}")
                time.sleep(0.2)
            for worker in self.workers:
                node = manager.nodes.get(worker.node_id)
                spec = node.attrs["Spec"]
                node.update(spec | {"Labels": spec.get("Labels", {}) | {DB_LABEL: "db"}})

    def load_image(self, image: str, source: str) -> None:
        """`docker save` once from `source`, `docker load` into every node at the same time."""
        save = subprocess.Popen(["docker", "-H", source, "save", image], stdout=subprocess.PIPE)
        loads = {
            node.name: subprocess.Popen(
                ["docker", "-H", node.url, "load", "-q"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for node in self.nodes
        }
        assert save.stdout is not None
        try:
            while chunk := save.stdout.read(1 << 20):
                for load in loads.values():
                    assert load.stdin is not None
                    load.stdin.write(chunk)
        finally:
            for load in loads.values():
                assert load.stdin is not None and load.stderr is not None
                load.stdin.close()
            save.wait()
            failures = [(name, load.wait(), load.stderr.read() if load.stderr else b"") for name, load in loads.items()]
        if save.returncode != 0:
            raise SwarmError(f"docker save {image} from {source} failed ({save.returncode})")
        if failed := [failure for failure in failures if failure[1] != 0]:
            raise SwarmError(f"docker load of {image} failed: {failed}")

    # Teardown

    def teardown(self) -> None:
        """Take down everything of this slot that exists, in reverse order of set-up."""
        self.leave_swarm()
        self.stop_daemons()
        for pid in self.leftover_processes():  # shims and servers a killed daemon left
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.unmount_all()
        for worker in self.workers:
            ip("link", "delete", self.veth(worker), missing_ok=True)  # and its peer in the namespace
            if worker.netns:
                ip("netns", "delete", worker.netns, missing_ok=True)
        ip("link", "delete", self.bridge, missing_ok=True)
        ip("link", "delete", self.gateway_bridge, missing_ok=True)
        self.remove_cgroups()
        for folder in (self.run_dir, self.data_dir):
            shutil.rmtree(folder, ignore_errors=True)

    def has_leftovers(self) -> bool:
        """Whether anything of this slot exists: its folders, links, namespaces or cgroups."""
        links = [self.bridge, self.gateway_bridge, *(self.veth(worker) for worker in self.workers)]
        paths = [self.run_dir, self.data_dir, *(Path("/sys/class/net") / link for link in links)]
        paths += [Path("/run/netns") / worker.netns for worker in self.workers if worker.netns]
        return any(path.exists() for path in paths) or bool(self.cgroup_dirs())

    def leave_swarm(self) -> None:
        """Workers first, the manager last; a node whose daemon is down is skipped."""
        for node in [*self.workers, self.manager]:
            if not Path(node.url.removeprefix("unix://")).exists():
                continue
            with (
                contextlib.suppress(docker.errors.DockerException),
                contextlib.closing(node.client(timeout=15)) as client,
            ):
                client.swarm.leave(force=True)

    def daemon_pid(self, node: Node) -> int | None:
        """The PID we started `node`'s dockerd with, or else the one in the pid file of a run that
        was killed, if that PID is still a dockerd of this slot."""
        if node.pid is not None or not node.pidfile.exists():
            return node.pid
        try:
            pid = int(node.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if f"{node.run_dir}/" in cmdline(pid) else None

    def stop_daemons(self) -> None:
        """SIGTERM to every dockerd at once, then up to STOP_TIMEOUT seconds, then SIGKILL."""
        running = [(node, pid) for node in self.nodes if (pid := self.daemon_pid(node)) is not None]
        for _, pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(alive(pid, node.process) for node, pid in running) and time.monotonic() < deadline:
            time.sleep(0.1)
        for node, pid in running:
            if alive(pid, node.process):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                if node.process is not None:
                    node.process.wait(10)
            node.pid = None

    def leftover_processes(self) -> set[int]:
        """Processes of this slot still running: any whose command line names its run folder
        (containerd, shims), and any in its nodes' cgroups (the containers' own)."""
        pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
        found = {pid for pid in pids if f"{self.run_dir}/" in cmdline(pid)}
        for procs in self.cgroup_dirs("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found |= {int(line) for line in procs.read_text().split()}
        return found - {os.getpid()}

    def mounts(self) -> list[str]:
        """Mount points under this slot's folders (dockerd leaves netns and overlay mounts)."""
        ours = (f"{self.run_dir}/", f"{self.data_dir}/")
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].encode().decode("unicode_escape")  # "\040" stands for a space
            if point.startswith(ours) or point in (str(self.run_dir), str(self.data_dir)):
                found.append(point)
        return found

    def unmount_all(self) -> None:
        for _ in range(5):  # a mount can hide another at the same point
            points = self.mounts()
            if not points:
                return
            for point in sorted(set(points), key=len, reverse=True):
                if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                    subprocess.run(["umount", "-l", point], capture_output=True)

    def cgroup_dirs(self, *inside: str) -> list[Path]:
        """This slot's cgroup folders in every v1 hierarchy, deepest first."""
        found: list[Path] = []
        if not CGROUP_ROOT.is_dir():
            return found
        for node in self.nodes:
            for top in CGROUP_ROOT.glob(f"*/{node.cgroup_parent.strip('/')}"):
                found += sorted((path for path in top.rglob("*") if path.is_dir()), key=lambda p: -len(p.parts))
                found.append(top)
        return [path.joinpath(*inside) for path in found]

    def remove_cgroups(self) -> None:
        for folder in self.cgroup_dirs():
            with contextlib.suppress(OSError):
                folder.rmdir()


def ip(*args: str, missing_ok: bool = False) -> None:
    """Run `ip`; with missing_ok, a link or namespace that is not there is not an error."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    missing = "Cannot find device" in result.stderr or "No such file or directory" in result.stderr
    if result.returncode != 0 and not (missing_ok and missing):
        raise SwarmError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int, process: subprocess.Popen[bytes] | None) -> bool:
    """Whether `pid` still runs (a zombie does not); our own child is reaped on the way."""
    if process is not None:
        return process.poll() is None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def clashes(network: ipaddress.IPv4Network, own_links: tuple[str, ...]) -> bool:
    """Whether an address or route of the root namespace, on a link not ours, overlaps `network`."""
    listing = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        parts = line.split()
        if parts[1] not in own_links and ipaddress.ip_interface(parts[3]).network.overlaps(network):
            return True
    for line in routes.splitlines():
        parts = line.split()
        target, device = parts[0], parts[parts.index("dev") + 1] if "dev" in parts else ""
        if target != "default" and device not in own_links and ipaddress.ip_network(target).overlaps(network):
            return True
    return False


def lock_slot(slot: int) -> IO[str] | None:
    """The slot's lock, held until `unlock_slot`, or None when another run holds it.

    The lock is taken on an open file and then checked to still be the file at that path, since a
    run that ends unlinks its lock file while another may be waiting on it."""
    path = RUN_ROOT / f"{PREFIX}-{slot}.lock"
    handle = path.open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
        handle.close()
        return None
    return handle


def unlock_slot(slot: int, handle: IO[str]) -> None:
    (RUN_ROOT / f"{PREFIX}-{slot}.lock").unlink(missing_ok=True)
    handle.close()


@contextlib.contextmanager
def claim_slot() -> Iterator[int]:
    """A slot no other run holds and whose addresses clash with nothing, locked until the block
    ends; the lock file is removed then."""
    for slot in SLOTS:
        handle = lock_slot(slot)
        if handle is None:
            continue
        cluster = Swarm(slot)
        own = (cluster.bridge, cluster.gateway_bridge, *(cluster.veth(w) for w in cluster.workers))
        if clashes(cluster.network, own) or clashes(cluster.gateway_network, own):
            unlock_slot(slot, handle)
            continue
        try:
            yield slot
        finally:
            unlock_slot(slot, handle)
        return
    raise SwarmError(f"no free slot among {PREFIX}-{SLOTS.start}…{SLOTS.stop - 1}")


def sweep() -> list[int]:
    """Clear every slot that no run holds of what a run killed there left behind; the slots cleared."""
    cleared = []
    for slot in SLOTS:
        cluster = Swarm(slot)
        if not cluster.has_leftovers():
            continue
        handle = lock_slot(slot)
        if handle is None:
            continue
        try:
            cluster.teardown()
            cleared.append(slot)
        finally:
            unlock_slot(slot, handle)
    return cleared


@contextlib.contextmanager
def swarm(image: str | None = None, image_source: str | None = None) -> Iterator[Swarm]:
    """A new three-node swarm (see the module's docstring), taken down however the block ends."""
    sweep()
    with claim_slot() as slot:
        cluster = Swarm(slot)
        try:
            cluster.setup(image, image_source)
            yield cluster
        finally:
            cluster.teardown()
