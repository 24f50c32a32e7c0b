"""The real swarm the swarm backend's tests stand on (devtools/swarm.py, issue 18).

A manager in the root network namespace and two workers in namespaces of their own, each worker a
dockerd of its own: Redis services pinned to one worker answer at that worker's address, under the
memory limit they were given, and when the cluster is taken down nothing of it is left.
Traffic goes only to the addresses of the run's own namespaces.

make test provides the image (scripts/ensure-docker); without root, dockerd or that image the tests
are skipped, except under CI=true, where that is a failure.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import docker.types
import pytest
import redis

import docker
from devtools.swarm import DB_LABEL, Node, Swarm, claim_slot, swarm
from provisioning.engines.redis import NO_RETRY

IMAGE = os.environ.get("STOCKROOM_TEST_DOCKER_IMAGE", "")
IMAGE_SOURCE = os.environ.get("STOCKROOM_TEST_DOCKER_URL", "")
REDIS_PORT = 6379  # in a worker's own namespace, at its own address: no other run can hold it
MEMORY_LIMIT = 64 * 1024 * 1024


def cannot_build() -> str | None:
    """Why a swarm cannot be built here, or None."""
    if os.geteuid() != 0:
        return "a swarm needs root (network namespaces, a bridge, dockerd)"
    for tool in ("dockerd", "docker", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install docker.io)"
    if not (IMAGE and IMAGE_SOURCE):
        return "no test image (make test builds it with scripts/ensure-docker)"
    return None


@pytest.fixture(scope="module")
def can_build() -> set[str]:
    """The root namespace's links before any swarm of this module was built."""
    reason = cannot_build()
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the swarm tests: {reason}")
    if reason:
        pytest.skip(reason)
    return links()


@pytest.fixture(scope="module")
def cluster(can_build):
    with swarm(IMAGE, IMAGE_SOURCE) as built:
        yield built


def links() -> set[str]:
    listing = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in listing.splitlines()}


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def mount_points() -> list[str]:
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def redis_service(cluster: Swarm, worker: Node):
    """A one-replica Redis service on host networking, pinned to `worker` and limited to 64 MiB."""
    manager = cluster.manager.client()
    # Protected mode would refuse clients from outside the worker; only this run reaches its address.
    bind = ["--bind", worker.address, "--port", str(REDIS_PORT), "--protected-mode", "no"]
    return manager.services.create(
        IMAGE,
        args=["redis-server", *bind, "--save", "", "--appendonly", "no"],
        name=f"{cluster.name}-redis-{worker.name}",
        constraints=[f"node.id=={worker.node_id}"],
        networks=["host"],
        endpoint_spec=docker.types.EndpointSpec(mode="dnsrr"),  # host networking has no virtual IP
        resources=docker.types.Resources(mem_limit=MEMORY_LIMIT),
        restart_policy=docker.types.RestartPolicy(condition="none"),
    )


def running_task(service, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        tasks = service.tasks()
        for task in tasks:
            if task["Status"]["State"] == "running":
                return task
            if task["Status"]["State"] in ("failed", "rejected"):
                pytest.fail(f"the task of {service.name} {task['Status']['State']}: {task['Status']}")
        assert time.monotonic() < deadline, f"no task of {service.name} runs after {timeout} s: {tasks}"
        time.sleep(0.2)


def pings(address: str, timeout: float = 30) -> bool:
    client = redis.Redis(host=address, port=REDIS_PORT, socket_timeout=2, socket_connect_timeout=2, retry=NO_RETRY)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.ping()
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def refuses(address: str) -> bool:
    client = redis.Redis(host=address, port=REDIS_PORT, socket_connect_timeout=2, retry=NO_RETRY)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        return "refused" in str(exc)
    return False


def test_the_swarm_has_a_manager_and_two_labelled_workers(cluster):
    nodes = {node.id: node.attrs for node in cluster.manager.client().nodes.list()}

    assert set(nodes) == {node.node_id for node in cluster.nodes}
    for node in cluster.nodes:
        attrs = nodes[node.node_id]
        assert attrs["Status"]["State"] == "ready", attrs["Status"]
        assert attrs["Spec"]["Availability"] == "active"
        assert attrs["Status"]["Addr"] == node.address
    assert nodes[cluster.manager.node_id]["ManagerStatus"]["Addr"] == f"{cluster.manager.address}:2377"
    assert nodes[cluster.manager.node_id]["Spec"].get("Labels", {}).get(DB_LABEL) is None
    for worker in cluster.workers:
        assert nodes[worker.node_id]["Spec"]["Role"] == "worker"
        assert nodes[worker.node_id]["Spec"]["Labels"][DB_LABEL] == "db"


@pytest.mark.parametrize("index", [0, 1], ids=["worker 1", "worker 2"])
def test_a_pinned_redis_service_answers_at_its_workers_address_within_its_memory_limit(cluster, index):
    worker, other = cluster.workers[index], cluster.workers[1 - index]
    service = redis_service(cluster, worker)
    removed = False
    try:
        task = running_task(service)

        assert task["NodeID"] == worker.node_id
        assert pings(worker.address)
        assert refuses(other.address), "the server must listen in its own worker's namespace only"
        container_id = task["Status"]["ContainerStatus"]["ContainerID"]
        server_pid = worker.client().containers.get(container_id).attrs["State"]["Pid"]
        cgroup = Path("/sys/fs/cgroup/memory") / worker.cgroup_parent.strip("/") / container_id
        assert (cgroup / "memory.limit_in_bytes").read_text().strip() == str(MEMORY_LIMIT)
        assert str(server_pid) in (cgroup / "cgroup.procs").read_text().split()

        service.remove()
        removed = True
        deadline = time.monotonic() + 30
        while not refuses(worker.address):
            assert time.monotonic() < deadline, "the server still answers 30 s after its service was removed"
            time.sleep(0.1)
    finally:
        if not removed:
            service.remove()


def test_teardown_after_a_half_made_set_up_leaves_nothing(can_build):
    """What a run killed during set-up leaves (the network, one worker's daemon) is cleared by a
    teardown that knows only the slot, as sweep() does for the next run."""
    with claim_slot() as slot:
        half = Swarm(slot)
        try:
            half.make_network()
            half.start_daemon(half.workers[0])
            pid = half.workers[0].pid
            assert Path(f"/run/netns/{half.workers[0].netns}").exists()
            assert Swarm(slot).has_leftovers()

            Swarm(slot).teardown()
            assert not Swarm(slot).has_leftovers()
            half.workers[0].process.wait(5)  # ours to reap: the other Swarm had only the pid file
        finally:
            half.teardown()
    assert_nothing_left(half, [pid], can_build)


def test_teardown_leaves_nothing(cluster, can_build):
    """Runs last: takes the module's cluster down (the fixture's own teardown then finds nothing)."""
    pids = [node.pid for node in cluster.nodes]
    assert all(pids)
    cluster.teardown()
    assert_nothing_left(cluster, pids, can_build)


def assert_nothing_left(cluster: Swarm, pids: list, links_before: set[str]) -> None:
    assert not {name for name in links() if name.startswith(cluster.name)}
    assert "docker_gwbridge" not in links() - links_before, "a docker_gwbridge was left in the root namespace"
    assert not {name for name in namespaces() if name.startswith(cluster.name)}
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"dockerd {pid} still runs"
    ours = (f"{cluster.run_dir}/", f"{cluster.data_dir}/")
    assert not [point for point in mount_points() if point.startswith(ours)]
    assert not cluster.run_dir.exists()
    assert not cluster.data_dir.exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/{cluster.name}-*"))
    processes = [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    assert not [p.name for p in processes if f"{cluster.run_dir}/".encode() in read_cmdline(p)]


def read_cmdline(process: Path) -> bytes:
    try:
        return (process / "cmdline").read_bytes()
    except OSError:
        return b""
