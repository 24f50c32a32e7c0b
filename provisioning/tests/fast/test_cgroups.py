"""How the local backend finds and writes cgroups, on a file tree laid out as each version's is.

Only one version can be real on a host (these machines mount v1); the OOM test in
test_confinement_local.py proves the limits on the real one. Here both layouts are read and
written as the kernel lays them out, so a host with the other version gets what it expects.
"""

from pathlib import Path

import pytest

from provisioning.backends.cgroups import Cgroups, Hierarchy


def mountinfo(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def v2(tmp_path) -> tuple[Path, Cgroups]:
    mount = tmp_path / "unified"
    mount.mkdir()
    (mount / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (mount / "cgroup.subtree_control").write_text("cpu\n")
    info = mountinfo(tmp_path, f"30 24 0:26 / {mount} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw")
    return mount, Cgroups(parent="/stockroom-test", mountinfo=info)


@pytest.fixture
def v1(tmp_path) -> tuple[Path, Cgroups]:
    root = tmp_path / "cgroup"
    for controller in ("memory", "pids", "cpu"):
        (root / controller).mkdir(parents=True)
    info = mountinfo(
        tmp_path,
        f"31 23 0:28 / {root} rw,relatime - tmpfs tmpfs rw,mode=755",
        f"32 31 0:29 / {root / 'cpu'} rw,relatime - cgroup cgroup rw,cpu",
        f"35 31 0:32 / {root / 'memory'} rw,relatime shared:9 - cgroup cgroup rw,memory",
        f"39 31 0:36 / {root / 'pids'} rw,relatime - cgroup cgroup rw,pids",
        f"41 31 0:38 / {tmp_path / 'unified'} rw,relatime - cgroup2 cgroup2 rw",
    )
    return root, Cgroups(parent="stockroom-test", mountinfo=info)


def test_v2_controllers_are_handed_down_and_one_cgroup_holds_both_limits(v2):
    mount, cgroups = v2
    assert cgroups.hierarchies == {"memory": Hierarchy(mount, 2), "pids": Hierarchy(mount, 2)}
    procs = cgroups.prepare("redis-7", memory=200 * 2**20, pids=64)
    instance = mount / "stockroom-test" / "redis-7"
    assert procs == [instance / "cgroup.procs"]
    assert (mount / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (mount / "stockroom-test" / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert (instance / "memory.max").read_text() == str(200 * 2**20)
    assert (instance / "memory.swap.max").read_text() == "0"
    assert (instance / "memory.oom.group").read_text() == "1", "when one process is killed, all are"
    assert (instance / "pids.max").read_text() == "64"
    assert cgroups.memory_limit("redis-7") == 200 * 2**20

    assert cgroups.oom_kills("redis-7") == 0
    (instance / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n")
    assert cgroups.oom_kills("redis-7") == 1
    assert cgroups.names() == {"redis-7"}
    assert "v2 memory" in cgroups.describe()


def test_v1_limits_go_to_each_controllers_own_hierarchy(v1):
    root, cgroups = v1
    assert cgroups.hierarchies == {"memory": Hierarchy(root / "memory", 1), "pids": Hierarchy(root / "pids", 1)}
    procs = cgroups.prepare("mysql-3", memory=512 * 2**20, pids=64)
    memory, pids = root / "memory" / "stockroom-test" / "mysql-3", root / "pids" / "stockroom-test" / "mysql-3"
    assert sorted(procs) == sorted([memory / "tasks", pids / "tasks"]), "a thread moves itself without a global lock"
    assert (memory / "memory.limit_in_bytes").read_text() == str(512 * 2**20)
    assert (memory / "memory.memsw.limit_in_bytes").read_text() == str(512 * 2**20), "no swap either"
    assert (pids / "pids.max").read_text() == "64"
    assert not (memory / "pids.max").exists() and not (pids / "memory.limit_in_bytes").exists()

    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cgroups.oom_kills("mysql-3") == 2
    assert cgroups.memory_limit("mysql-3") == 512 * 2**20


def test_a_host_without_a_controller_says_which(tmp_path):
    info = mountinfo(tmp_path, f"35 31 0:32 / {tmp_path} rw,relatime - cgroup cgroup rw,memory")
    cgroups = Cgroups(parent="stockroom-test", mountinfo=info)
    assert cgroups.problem() == "this host has no pids cgroup controller"
    assert cgroups.oom_kills("redis-1") == 0
