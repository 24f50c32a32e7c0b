"""3. Memory of one idle instance of each kind with default options, and how many fit in 1 GiB.

PSS (proportional set size) counts pages shared with other processes (the binary, libc) in
part, so it is the fair share of one instance among many; RSS and private memory are recorded
too. Read from /proc/<pid>/smaps_rollup of the server process after it has idled a while.
"""

import time
from pathlib import Path

from django.conf import settings

from provisioning.backends.local import processes_under

from . import report
from .client import create_and_connect, delete_all

IDLE_SECONDS = 5
GiB = 1024**3
MB = 1024**2


def memory(pid: int) -> dict[str, int]:
    """Rss, Pss and Private bytes of one process."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return {
        "rss": fields["Rss"],
        "pss": fields["Pss"],
        "private": fields["Private_Clean"] + fields["Private_Dirty"],
    }


def server_pid(kind: str, instance_id: int) -> int:
    """The instance's server: the one process working in its directory (see the local backend)."""
    pids = processes_under(settings.STOCKROOM_INSTANCES_DIR / kind / str(instance_id))
    if len(pids) != 1:
        raise RuntimeError(f"expected one server process for {kind} {instance_id}, found {pids}")
    return pids[0]


def run(token: str) -> dict:
    report.progress("density: one idle instance of each kind")
    created = [create_and_connect(token, kind) for kind in ("mysql", "redis")]
    time.sleep(IDLE_SECONDS)
    results = {}
    for instance in created:
        used = memory(server_pid(instance.kind, instance.id))
        results[instance.kind] = {f"{name}_mb": round(value / MB, 1) for name, value in used.items()}
        results[instance.kind]["per_gib_by_pss"] = GiB // used["pss"]
    delete_all(token, created)
    results["idle_seconds"] = IDLE_SECONDS
    return results
