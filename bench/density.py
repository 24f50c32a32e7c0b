"""3. Memory of idle instances with default options, and how many fit in 1 GiB.

PSS (proportional set size) splits each page among the processes that map it, so a server's
figure depends on what else runs: its program's code and constants (about 19 MB for mariadbd) are
shared by every server of that program on the host, another session's included. Two figures are
kept apart, each read from /proc/<pid>/smaps of a server process after it has idled a while:

- **alone**: one instance, with the pages of the files that only servers of its kind map (its
  program, and libraries no other program on the host has loaded) counted whole, as if no other
  server of its kind ran (the Rss of those mappings in place of their Pss). It does not depend on
  how many such servers run, so it is the figure the target is checked against.
- **one of 10**: ten idle instances of a kind at once, those pages split ten ways (their Rss ÷ 10);
  what one more instance costs on a host that runs many. The PSS the kernel reports for them is
  recorded too, with the number of other processes that ran the same program at the time: it is
  lower than the split figure when others (another portal, the tests) shared it.

Files that processes of other programs map too (libc, say) are counted as the kernel splits them
in both. RSS and private memory are recorded too.
"""

import os
import time
from pathlib import Path

from django.conf import settings

from provisioning.backends.local import processes_under

from . import report
from .client import Created, create_and_connect, delete_all, in_parallel

IDLE_SECONDS = 5
TOGETHER = 10  # instances of a kind idling at once for the "one of 10" figure
DELETE_BATCH = 4
GiB = 1024**3
MB = 1024**2


def memory(pid: int) -> dict[str, int]:
    """Rss, Pss and Private bytes of one process, and the Rss and Pss of its mappings of files that
    no process of another program maps (its program file, and libraries only servers like it load):
    the pages it shares only with servers of its own kind."""
    program = os.readlink(f"/proc/{pid}/exe")
    elsewhere = files_mapped_by_other_programs(program)
    totals = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    own = {"Rss": 0, "Pss": 0}
    counted = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        name, _, rest = line.partition(":")
        if " " in name or "-" in name:  # a mapping's header: "start-end perms offset dev inode path"
            path = line.split(maxsplit=5)[5:]
            counted = bool(path) and path[0].startswith("/") and path[0] not in elsewhere
        elif name in totals:
            value = int(rest.split()[0]) * 1024
            totals[name] += value
            if counted and name in own:
                own[name] += value
    return {
        "rss": totals["Rss"],
        "pss": totals["Pss"],
        "private": totals["Private_Clean"] + totals["Private_Dirty"],
        "program_rss": own["Rss"],
        "program_pss": own["Pss"],
    }


def files_mapped_by_other_programs(program: str) -> set[str]:
    """Every file that some process running another program than `program` maps."""
    found: set[str] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.readlink(entry / "exe") == program:
                continue
            maps = (entry / "maps").read_text()
        except OSError:  # gone, or a kernel thread
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[5:]
            if path and path[0].startswith("/"):
                found.add(path[0])
    return found


def alone(used: dict[str, int]) -> int:
    """PSS with the pages it shares only with servers of its kind counted whole: as if no other
    server of its kind ran."""
    return used["pss"] - used["program_pss"] + used["program_rss"]


def split(used: dict[str, int], ways: int) -> int:
    """PSS with those pages split `ways` ways (every one of `ways` servers maps them)."""
    return used["pss"] - used["program_pss"] + used["program_rss"] // ways


def others_running(program: str, ours: set[int]) -> int:
    """Processes on the host, not in `ours`, that run `program` (they share its pages)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in ours:
            try:
                count += os.readlink(entry / "exe") == program
            except OSError:  # gone, or a kernel thread
                pass
    return count


def server_pid(kind: str, instance_id: int) -> int:
    """The instance's server: the one process working in its directory (see the local backend)."""
    pids = processes_under(settings.STOCKROOM_INSTANCES_DIR / kind / str(instance_id))
    if len(pids) != 1:
        raise RuntimeError(f"expected one server process for {kind} {instance_id}, found {pids}")
    return pids[0]


def _mb(value: float) -> float:
    return round(value / MB, 1)


def measure_alone(instance: Created) -> dict:
    pid = server_pid(instance.kind, instance.id)
    used = memory(pid)
    return {
        "pss_mb": _mb(alone(used)),
        "rss_mb": _mb(used["rss"]),
        "private_mb": _mb(used["private"]),
        "program_rss_mb": _mb(used["program_rss"]),
        "per_gib_by_pss": GiB // alone(used),
        # What the kernel reported, and how many other processes ran the program then.
        "pss_reported_mb": _mb(used["pss"]),
        "others_running_program": others_running(os.readlink(f"/proc/{pid}/exe"), {pid}),
    }


def measure_together(instances: list[Created]) -> dict:
    pids = [server_pid(instance.kind, instance.id) for instance in instances]
    used = [memory(pid) for pid in pids]
    ways = len(instances)
    each = sum(split(one, ways) for one in used) / ways
    return {
        "count": ways,
        "pss_mb": _mb(each),
        "per_gib_by_pss": int(GiB // each),
        "private_mb": _mb(sum(one["private"] for one in used) / ways),
        "pss_reported_mb": _mb(sum(one["pss"] for one in used) / ways),
        "others_running_program": others_running(os.readlink(f"/proc/{pids[0]}/exe"), set(pids)),
    }


def run(token: str) -> dict:
    results: dict = {"idle_seconds": IDLE_SECONDS}
    for kind in ("mysql", "redis"):
        report.progress(f"density: one idle {kind} instance, then {TOGETHER} at once")
        first = create_and_connect(token, kind)
        time.sleep(IDLE_SECONDS)
        results[kind] = measure_alone(first)
        rest = in_parallel(create_and_connect, [token] * (TOGETHER - 1), [kind] * (TOGETHER - 1), workers=4)
        time.sleep(IDLE_SECONDS)
        results[kind]["together"] = measure_together([first, *rest])
        created = [first, *rest]
        for start in range(0, TOGETHER, DELETE_BATCH):  # each delete snapshots the data: a few at a time
            delete_all(token, created[start : start + DELETE_BATCH])
    return results
