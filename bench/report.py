"""Numbers and their presentation: percentiles, the machine, the Markdown table and the JSON."""

import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from devtools.postgres import postgres_version

from .stack import BASE_DIR

RESULTS = BASE_DIR / "bench" / "results.json"

# Targets for the 2-core test machine (issue 6).
TARGETS = {
    "redis_connectable_p50_ms": 150,
    "mysql_connectable_p50_ms": 600,
    # Issue 17 (it was 60 in issue 6): one idle instance alone (bench/density.py).
    "idle_mysql_pss_mb": 40,
    "idle_redis_pss_mb": 8,
    # Issue 17: 100,000 rows over 2,000 users, 8 clients; 1,000 running instances per reconcile pass.
    "list_p95_ms": 20,
    "config_p95_ms": 15,
    "admin_p95_ms": 300,
    "reconcile_seconds": 2,
    # Issue 13, for 100 MB of data: the median of the run's repeats.
    "snapshot_seconds": 3,
    "restore_seconds": 5,
    "clone_seconds": 5,
    # Issue 14, the same 100 MB with 10,000 writes after the base: the median of the run's repeats.
    "pitr_restore_seconds": 10,
    "pitr_clone_seconds": 10,
    # Issue 17: the warm pool, against a bare start and the naive baseline measured in the same run.
    "pooled_redis_p50_ms": 25,
    "pooled_redis_bare_ratio": 1.2,  # a bare redis-server start ÷ a pooled create, p50: at least
    "pooled_mysql_p50_ms": 60,
    "pooled_mysql_bare_ratio": 10,  # mariadb-install-db + mariadbd ÷ a pooled create, p50: at least
    "pooled_concurrent_p95_ms": 150,
    "burst_seconds": 10,
}


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def summary(seconds: list[float]) -> dict:
    """Count, p50, p95 and max in milliseconds (p95 interpolated between samples)."""
    p95 = statistics.quantiles(seconds, n=20, method="inclusive")[-1] if len(seconds) > 1 else seconds[0]
    return {
        "n": len(seconds),
        "p50_ms": round(statistics.median(seconds) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


def _first_line(*argv: str) -> str:
    try:
        return " ".join(subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0].split())
    except (OSError, IndexError):
        return "not found"


def machine() -> dict:
    """What the numbers were measured on."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    memory_kb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal:")))
    os_release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": _first_line("git", "-C", str(BASE_DIR), "rev-parse", "--short", "HEAD"),
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kb / 1024**2, 1),
        "os": os_release.get("PRETTY_NAME", "").strip('"'),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mariadb": _first_line("mariadbd", "--version"),
        "redis": _first_line("redis-server", "--version"),
        "postgresql": postgres_version() or "not installed",
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
    }


def write(results: dict) -> None:
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


# The table ----------------------------------------------------------------------------


def _met(value: float, target: float) -> str:
    return "yes" if value <= target else "**no**"


def _percentiles(numbers: dict) -> str:
    return f"p50 {numbers['p50_ms']:g} · p95 {numbers['p95_ms']:g} · max {numbers['max_ms']:g} ms"


def table(results: dict) -> str:
    """The Markdown table the README quotes: each measurement, its target and whether it was met
    (only the sections that ran)."""
    rows = []
    for section, make_rows in (
        ("connectable", _connectable_rows),
        ("density", _density_rows),
        ("api_load", _api_load_rows),
        ("reconcile", _reconcile_rows),
        ("snapshots", _snapshot_rows),
        ("pitr", _pitr_rows),
        ("changes", _changes_rows),
        ("pool", _pool_rows),
    ):
        if section in results:
            rows += make_rows(results)
    lines = ["| measurement | result | target | met |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    return "\n".join(lines)


Row = tuple[str, str, str, str]


def _connectable_rows(results: dict) -> list[Row]:
    rows = []
    connectable = results["connectable"]
    concurrency = connectable["concurrency"]
    for kind, name in (("redis", "Redis"), ("mysql", "MySQL")):
        numbers = connectable[kind]
        target = TARGETS[f"{kind}_connectable_p50_ms"]
        n = numbers["sequential"]["n"]
        rows += [
            (
                f"1. {name} time to connectable, API path, {n} sequential",
                _percentiles(numbers["sequential"]),
                f"p50 ≤ {target} ms",
                _met(numbers["sequential"]["p50_ms"], target),
            ),
            (
                f"1. {name} time to connectable, API path, {n} at {concurrency} at a time",
                _percentiles(numbers["concurrent"]),
                "",
                "",
            ),
            (
                f"1. {name} naive baseline, sequential / {concurrency} at a time",
                f"p50 {numbers['baseline_sequential']['p50_ms']:g} / {numbers['baseline_concurrent']['p50_ms']:g} ms;"
                f" baseline ÷ portal p50: {numbers['baseline_over_portal_p50_sequential']:g}×"
                f" / {numbers['baseline_over_portal_p50_concurrent']:g}×",
                "",
                "",
            ),
        ]
    steps = results["breakdown"]["steps_ms"]
    rows.append(
        (
            "2. One MySQL create, step by step",
            f"API {steps['api']:g} · queued {steps['queued']:g} · data directory {steps['data_directory']:g}"
            f" · server start incl. user creation {steps['server_start']:g} · first login {steps['first_login']:g}"
            f" · status poll, config and client login {steps['status_poll_config_and_client_login']:g}"
            f" = {results['breakdown']['total_ms']:g} ms",
            "",
            "",
        )
    )
    return rows


def _density_rows(results: dict) -> list[Row]:
    rows = []
    for kind, name in (("mysql", "MySQL"), ("redis", "Redis")):
        memory = results["density"][kind]
        target = TARGETS[f"idle_{kind}_pss_mb"]
        together = memory["together"]
        rows += [
            (
                f"3. Idle {name}, default options, alone (what only {name} servers map counted whole)",
                f"PSS {memory['pss_mb']:g} MB (RSS {memory['rss_mb']:g}, private {memory['private_mb']:g},"
                f" files only {name} servers map {memory['program_rss_mb']:g});"
                f" {memory['per_gib_by_pss']} fit in 1 GiB;"
                f" the kernel reported {memory['pss_reported_mb']:g} with {memory['others_running_program']}"
                f" other {name} servers on the host",
                "",
                "",
            ),
            (
                f"3. Idle {name}, one of {together['count']} at once (what only {name} servers map split"
                f" {together['count']} ways)",
                f"PSS {together['pss_mb']:g} MB each (private {together['private_mb']:g});"
                f" {together['per_gib_by_pss']} fit in 1 GiB; the kernel reported {together['pss_reported_mb']:g}"
                f" with {together['others_running_program']} other {name} servers on the host",
                # Density is a host holding many: PSS shares what they all map, as the kernel does.
                f"≤ {target} MB",
                _met(together["pss_mb"], target),
            ),
        ]
    return rows


def _api_load_rows(results: dict) -> list[Row]:
    rows = []
    for database, load in results["api_load"].items():
        if "skipped" in load:
            rows.append((f"4. API under load, {database}", load["skipped"], "", ""))
            continue
        label = f"4. {database}, {load['rows']:,} rows ({load['live']:,} live) of {load['users']:,} users,"
        label += f" {load['clients']} clients:"
        for endpoint, path in (
            ("list", "a user's `GET …/instances`"),
            ("config", "`GET …/{id}/config`"),
            ("admin", "admin instance list, filtered (`?status__exact=running`, `?kind=redis`)"),
        ):
            numbers, target = load[endpoint], TARGETS[f"{endpoint}_p95_ms"]
            rows.append(
                (
                    f"{label} {path}",
                    f"p50 {numbers['p50_ms']:g} · p95 {numbers['p95_ms']:g} ms"
                    f" · {numbers['requests_per_second']:g} req/s",
                    f"p95 ≤ {target} ms",
                    _met(numbers["p95_ms"], target),
                )
            )
        for endpoint, counts in load["queries"].items():
            rows.append(
                (
                    f"{label} SQL queries per {endpoint} request",
                    " · ".join(f"{count} at {rows_}" for rows_, count in counts.items()),
                    "the same at few rows and at many",
                    "yes" if len(set(counts.values())) == 1 else "**no**",
                )
            )
    return rows


def _reconcile_rows(results: dict) -> list[Row]:
    reconcile = results["reconcile"]
    return [
        (
            f"5. Reconcile pass, {reconcile['instances']} running instances"
            f" ({reconcile['redis']} Redis + {reconcile['mysql']} MySQL)",
            f"{reconcile['median_seconds']:g} s per pass"
            f" (median of {len(reconcile['passes'])}; max {reconcile['max_seconds']:g} s); its phases: "
            + ", ".join(f"{name} {seconds:g}" for name, seconds in reconcile.get("median_pass_phases", {}).items()),
            f"≤ {TARGETS['reconcile_seconds']} s",
            _met(reconcile["median_seconds"], TARGETS["reconcile_seconds"]),
        )
    ]


def _snapshot_rows(results: dict) -> list[Row]:
    rows = []
    snapshots = results["snapshots"]
    repeats = snapshots["repeats"]
    for kind, name, baseline in (
        ("mysql", "MySQL", "`mariadb-dump \\| mariadb` into an empty instance"),
        ("redis", "Redis", "`redis-cli --rdb`, then a new `redis-server` on the file"),
    ):
        numbers = snapshots[kind]
        data = f"{numbers['data_mb']:g} MB {name}" + (" database" if kind == "mysql" else "")
        for step, what in (
            ("snapshot", "snapshot, POST to `ready`"),
            ("restore", "restore in place, POST to `running` and the data served, data checked"),
            ("clone", "clone, POST to the first login, data checked"),
        ):
            seconds, running = numbers[step], numbers["restore_to_running"]
            target = TARGETS[f"{step}_seconds"]
            rows.append(
                (
                    f"6. {data}: {what}",
                    f"{seconds['median_seconds']:g} s"
                    + (f" (median of {repeats}; max {seconds['max_seconds']:g} s)" if repeats > 1 else "")
                    + (f"; {numbers['snapshot_mb']:g} MB file" if step == "snapshot" else "")
                    + (f"; `running` after {running['median_seconds']:g} s" if step == "restore" else ""),
                    f"≤ {target} s",
                    _met(seconds["median_seconds"], target),
                )
            )
        rows.append(
            (
                f"6. {data}: naive baseline, {baseline}",
                f"{numbers['baseline_seconds']:g} s; baseline ÷ portal:"
                f" {numbers['baseline_over_snapshot_and_restore']:g}× snapshot + restore,"
                f" {numbers['baseline_over_snapshot_and_clone']:g}× snapshot + clone",
                "",
                "",
            )
        )
    return rows


def _pitr_rows(results: dict) -> list[Row]:
    rows = []
    pitr = results["pitr"]
    repeats = pitr["repeats"]

    def seconds(numbers: dict) -> str:
        more = f" (median of {repeats}; max {numbers['max_seconds']:g} s)" if repeats > 1 else ""
        return f"{numbers['median_seconds']:g} s{more}"

    for kind, name, unit in (("mysql", "MySQL", "single-row `INSERT`s"), ("redis", "Redis", "`SET`s")):
        numbers = pitr[kind]
        data = (
            f"{numbers['data_mb']:g} MB {name}" + (" database" if kind == "mysql" else "")
            + f" + {pitr['writes']:,} {unit} over {numbers['write_spread_seconds']:g} s after the base snapshot"
        )  # fmt: skip
        before = f"{numbers['writes_before_time']:,}"
        rows += [
            (
                f"6. {data}: point-in-time restore to a second mid-way ({before} writes before it),"
                " POST to `running` and the data served, data checked",
                f"{seconds(numbers['pitr'])}; `running` after {numbers['pitr_to_running']['median_seconds']:g} s",
                f"≤ {TARGETS['pitr_restore_seconds']} s",
                _met(numbers["pitr"]["median_seconds"], TARGETS["pitr_restore_seconds"]),
            ),
            (
                f"6. {data}: clone as of that second, POST to the first login, data checked",
                seconds(numbers["clone"]),
                f"≤ {TARGETS['pitr_clone_seconds']} s",
                _met(numbers["clone"]["median_seconds"], TARGETS["pitr_clone_seconds"]),
            ),
            (
                f"6. {data}: baseline, restore of the base snapshot itself, same run, data checked",
                f"{seconds(numbers['snapshot_restore'])}; point in time ÷ snapshot restore:"
                f" {numbers['pitr_over_snapshot_restore']:g}× (+{numbers['pitr_minus_snapshot_restore_seconds']:g} s)",
                "",
                "",
            ),
        ]
    return rows


def _changes_rows(results: dict) -> list[Row]:
    rows = []
    changes = results["changes"]
    for kind, name, live, baseline in (
        ("redis", "Redis", "`maxmemory` 64mb ↔ 96mb (a resize)", "`databases` by restart, `PATCH …?apply=now`"),
        (
            "mysql",
            "MySQL",
            "`innodb_buffer_pool_size` 16mb ↔ 32mb + `max_connections` 100 ↔ 150 (a resize)",
            "`POST …/restart` (no MySQL option waits for a restart yet)",
        ),
    ):
        numbers = changes[kind]
        rows += [
            (f"7. {name} live change, {live}: PATCH to its `202` answer", _percentiles(numbers["live_answer"]), "", ""),
            (
                f"7. {name} live change: PATCH to the new value read back with the user's credentials,"
                f" same server process ({numbers['same_process_live_changes']} of {numbers['live']['n']})",
                f"{_percentiles(numbers['live'])}; up p50 {numbers['live_up_p50_ms']:g}"
                f" · down p50 {numbers['live_down_p50_ms']:g} ms",
                "",
                "",
            ),
            (
                f"7. {name} baseline, {baseline}: request to the first login, a new server process",
                f"{_percentiles(numbers['restart'])}; `running` p50 {numbers['restart_running']['p50_ms']:g} ms",
                "",
                "",
            ),
            (
                f"7. {name} live change ÷ restart, {changes['rows_or_keys']:,}"
                f" {'rows' if kind == 'mysql' else 'keys'} of {changes['row_bytes']:,} bytes checked after each",
                f"live is {numbers['restart_over_live_p50']:g}× faster (restart p50 ÷ live p50);"
                f" data intact after all {numbers['data_checks']} changes and restarts",
                "",
                "",
            ),
        ]
    return rows


def describe_machine(info: dict) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM; {info['os']}, Linux {info['kernel']};"
        f" Python {info['python']}; {info['mariadb']}; {info['redis']}; {info['postgresql']}."
        f" Load average at start {info['load_average_at_start']}; {info['date']}, commit {info['commit']}."
    )


def _at_least(value: float, target: float) -> str:
    return "yes" if value >= target else "**no**"


def _pool_rows(results: dict) -> list[Row]:
    rows = []
    pool = results["pool"]
    for kind, name, bare in (
        ("redis", "Redis", "a bare `redis-server` start"),
        ("mysql", "MySQL", "the naive `mariadb-install-db` + `mariadbd`"),
    ):
        numbers = pool[kind]
        p50, ratio = TARGETS[f"pooled_{kind}_p50_ms"], TARGETS[f"pooled_{kind}_bare_ratio"]
        n = numbers["pooled_sequential"]["n"]
        rows += [
            (
                f"8. {name} from the warm pool, `POST ?wait=30` to the first login, {n} sequential",
                _percentiles(numbers["pooled_sequential"]),
                f"p50 ≤ {p50} ms",
                _met(numbers["pooled_sequential"]["p50_ms"], p50),
            ),
            (
                f"8. {name}: {bare}, same run (login tried every 2 ms) ÷ pooled, p50",
                f"bare p50 {numbers['bare_sequential']['p50_ms']:g} ms: pooled is {numbers['bare_over_pooled_p50']:g}×"
                " faster",
                f"≥ {ratio:g}×",
                _at_least(numbers["bare_over_pooled_p50"], ratio),
            ),
            (
                f"8. {name} from the warm pool, {pool['pool']} at once (pool of {pool['pool']}),"
                f" {numbers['pooled_concurrent']['n']} creates",
                _percentiles(numbers["pooled_concurrent"]),
                f"p95 ≤ {TARGETS['pooled_concurrent_p95_ms']} ms",
                _met(numbers["pooled_concurrent"]["p95_ms"], TARGETS["pooled_concurrent_p95_ms"]),
            ),
            (
                f"8. {name} cold path (an option that needs a restart), `POST ?wait=30` to the first login",
                _percentiles(numbers["cold_sequential"]),
                "no slower than section 1",
                "",
            ),
        ]
    burst = pool["burst"]
    rows.append(
        (
            f"8. A burst of {burst['creates']} Redis creates from {burst['clients']} clients: all running and"
            " logged in to",
            f"{burst['all_running_seconds']:g} s ({burst['from_pool']} from the pool)",
            f"≤ {TARGETS['burst_seconds']} s",
            _met(burst["all_running_seconds"], TARGETS["burst_seconds"]),
        )
    )
    return rows
