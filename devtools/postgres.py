"""A throwaway PostgreSQL cluster on 127.0.0.1, for the test suite and the benchmark.

`python devtools/postgres.py PORT COMMAND...` (what scripts/with-postgres runs) starts a cluster,
runs COMMAND with DATABASE_URL pointing at it, then stops the cluster by its PID and removes its
files, however COMMAND ends. Only the standard library: it runs before any virtualenv exists.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Settings that trade durability for speed: nothing in a throwaway cluster must survive a crash.
NOT_DURABLE = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def postgres_bin() -> Path | None:
    """The folder with Debian's (or any) initdb and postgres, or None if PostgreSQL is not installed."""
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: int(path.parts[-3]))
    return versions[-1].parent if versions else None


def postgres_version() -> str | None:
    binaries = postgres_bin()
    if binaries is None:
        return None
    return subprocess.run([binaries / "postgres", "--version"], capture_output=True, text=True).stdout.strip()


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:`port` (connections closing on it do not count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres does
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@contextmanager
def postgres_cluster(
    port: int, *, prefix: str = "stockroom-pg-", settings: dict[str, str] | None = None, timeout: float = 60
) -> Iterator[str | None]:
    """A new cluster listening on 127.0.0.1:`port` only; yields its DATABASE_URL.

    Yields None when PostgreSQL is not installed. When we are root the cluster runs as the
    `postgres` user, which PostgreSQL requires. Afterwards the server is stopped (by the PID we
    started) and every file of the cluster is gone.
    """
    binaries = postgres_bin()
    if binaries is None:
        yield None
        return
    if not port_is_free(port):
        raise RuntimeError(f"Port {port} is in use; is a cluster from an earlier run still up? (see /tmp/{prefix}*)")
    owner = {}
    if os.geteuid() == 0:  # postgres refuses to run as root
        account = pwd.getpwnam("postgres")
        owner = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    root = Path(tempfile.mkdtemp(prefix=prefix))
    data, log = root / "data", root / "server.log"
    server = None
    try:
        if owner:
            os.chown(root, owner["user"], owner["group"])
        initdb = [binaries / "initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(initdb, check=True, capture_output=True, **owner)
        argv = [binaries / "postgres", "-D", data, "-k", root, "-c", "listen_addresses=127.0.0.1", "-p", str(port)]
        for name, value in (settings or {}).items():
            argv += ["-c", f"{name}={value}"]
        with open(log, "ab") as output:
            server = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only our caller, which then stops the server
                **owner,
            )
        _wait_until_ready(server, data, log, timeout)
        yield f"postgres://postgres@127.0.0.1:{port}/postgres"
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGINT)  # "fast" shutdown: roll back sessions, then exit
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_ready(server: subprocess.Popen, data: Path, log: Path, timeout: float) -> None:
    """Until this server (not another one on the port) says "ready" in its postmaster.pid."""
    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"postgres exited with {server.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            if (data / "postmaster.pid").read_text().splitlines()[-1].strip() == "ready":
                return
        except (OSError, IndexError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"postgres was not ready within {timeout:g} s")
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or not argv[0].isdigit():
        print("usage: python devtools/postgres.py PORT COMMAND...", file=sys.stderr)
        return 2
    port, command = int(argv[0]), argv[1:]

    def stop(signum, frame):  # so that `finally` stops the cluster when we are told to end
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    try:
        with postgres_cluster(port, prefix="stockroom-test-pg-", settings=NOT_DURABLE) as url:
            if url is None:
                print("PostgreSQL is not installed (scripts/ensure-system postgresql installs it).", file=sys.stderr)
                return 1
            print(f"PostgreSQL cluster for this run: {url}", file=sys.stderr)
            return run(command, env=os.environ | {"DATABASE_URL": url})
    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace") if isinstance(exc, subprocess.CalledProcessError) else ""
        print(f"Could not start PostgreSQL: {exc} {detail}", file=sys.stderr)
        return 1


def run(command: list[str], *, env: dict[str, str]) -> int:
    child = subprocess.Popen(command, env=env)
    try:
        return child.wait()
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt):  # Ctrl-C reached the command too; a SIGTERM did not
            child.terminate()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
