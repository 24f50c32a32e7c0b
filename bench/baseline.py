"""The naive baseline: per instance, a fresh `mariadb-install-db` and `mariadbd`, or a plain
`redis-server`, timed from the first command to the first successful login, as the portal is.

It creates no user and no database (MySQL's password-less root logs in), so it does less work
than the portal; the servers run with their built-in defaults. Each MariaDB gets its own tmpdir:
bootstraps running at once in a shared /tmp were seen to lose each other's temporary tables.
"""

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .client import CREATE_TIMEOUT, POLL_INTERVAL, in_parallel, wait_for_login
from .stack import BASELINE_PORTS, give_to_run_as, run_as_kwargs


def start_and_connect(
    kind: str, port: int, directory: Path, *, poll: float = POLL_INTERVAL
) -> tuple[float, subprocess.Popen]:
    """Start one server in `directory`; returns the seconds until a login worked (tried every
    `poll` seconds), and the server."""
    start = time.perf_counter()
    if kind == "mysql":
        data = directory / "data"
        installed = subprocess.run(
            ["mariadb-install-db", "--no-defaults", f"--datadir={data}", f"--tmpdir={directory}"]
            + ["--auth-root-authentication-method=normal", "--skip-test-db"],
            cwd=directory,
            capture_output=True,
            text=True,
            **run_as_kwargs(),
        )
        if installed.returncode:
            raise RuntimeError(f"mariadb-install-db failed: {(installed.stderr or installed.stdout)[-500:]}")
        argv = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--tmpdir={directory}"]
        argv += [f"--socket={directory / 'server.sock'}"]
        argv += [f"--port={port}", "--bind-address=127.0.0.1", f"--log-error={directory / 'server.log'}"]
        config = {"host": "127.0.0.1", "port": port, "username": "root", "password": ""}
    else:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
        config = {"host": "127.0.0.1", "port": port}
    server = subprocess.Popen(
        argv, cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        **run_as_kwargs(),
    )  # fmt: skip
    try:
        wait_for_login(kind, config, deadline=start + CREATE_TIMEOUT, poll=poll)
    except BaseException:
        server.kill()
        server.wait()
        raise
    return time.perf_counter() - start, server


def run(kind: str, count: int, *, workers: int, poll: float = POLL_INTERVAL) -> list[float]:
    """Seconds to connectable for `count` servers started `workers` at a time (a login tried every
    `poll` seconds); all are removed after."""
    servers: list[subprocess.Popen] = []
    root = Path(tempfile.mkdtemp(prefix="stockroom-bench-baseline-"))
    give_to_run_as(root)

    def one(index: int) -> float:
        directory = root / str(index)
        directory.mkdir()
        give_to_run_as(directory)
        seconds, server = start_and_connect(kind, BASELINE_PORTS[index], directory, poll=poll)
        servers.append(server)
        return seconds

    try:
        return in_parallel(one, range(count), workers=workers)
    finally:
        for server in servers:
            server.kill()
        for server in servers:
            server.wait()
        shutil.rmtree(root, ignore_errors=True)
