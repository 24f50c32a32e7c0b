"""The processes the benchmark runs against: broker, Celery worker, gunicorn and, when it is
installed, a throwaway PostgreSQL cluster (devtools.postgres, which the tests use too). All on
127.0.0.1; all stopped by the PID we started.
"""

import os
import pwd
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devtools import postgres

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = BASE_DIR / "var" / "bench"
LOG_DIR = DATA_DIR / "logs"


def _port_range(name: str, default: str) -> tuple[int, int]:
    first, last = os.environ.get(name, default).split(",")
    return int(first), int(last)


# Each port can be moved with an environment variable (two benches on one host, or a bench beside
# a test run); the defaults are these.
WEB_PORT = int(os.environ.get("BENCH_WEB_PORT", "8700"))
BROKER_PORT = int(os.environ.get("BENCH_BROKER_PORT", "32700"))
POSTGRES_PORT = int(os.environ.get("BENCH_POSTGRES_PORT", "32701"))
# Portal instances take 18000-19499 (1,500 ports: the reconcile section's 1,000 instances, and
# room for those still being deleted), the naive baseline's servers 30900-30999: below Linux's
# ephemeral ports (32768 and up), which any client connection may hold when a server wants to
# listen, and apart from `make run` (20000-29999) and the test suite (31000-31999).
PORT_RANGE = _port_range("BENCH_PORT_RANGE", "18000,19499")
# What the bench creates at most at once: the reconcile section's 1,000 instances, plus the warm-up's.
QUOTA = 1500
# Instances' memory limits count against the budget, not what they use: 1,000 Redis at the default
# limit would pass a budget of 75 % of RAM. The bench's own budget lets them all in; their real
# use (a few MB each when idle) is what has to fit the machine.
MEMORY_BUDGET = "1024gb"
_baseline_first, _baseline_last = _port_range("BENCH_BASELINE_PORTS", "30900,30999")
BASELINE_PORTS = range(_baseline_first, _baseline_last + 1)
RUN_AS = "stockroom"  # instance and baseline servers run as this user when we are root
BROKER_PASSWORD = secrets.token_urlsafe(24)  # new for every run, like the keys


def environment(*, database_url: str | None = None) -> dict[str, str]:
    """The portal's settings for the bench stack: its own DATA_DIR, database, ports, and quotas
    and a memory budget high enough for the reconcile measurement's 1,000 idle instances, whatever
    `.env` says (`limits()` says which). Keys are random per run: every run starts from an empty
    database.
    """
    return os.environ | {
        "DJANGO_SETTINGS_MODULE": "portal.settings",
        "DEBUG": "False",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "STOCKROOM_ENCRYPTION_KEYS": secrets.token_urlsafe(48),
        "DATA_DIR": str(DATA_DIR),
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{BROKER_PORT}/0",
        "STOCKROOM_BROKER_PASSWORD": BROKER_PASSWORD,
        "CELERY_TASK_ALWAYS_EAGER": "False",
        "STOCKROOM_PORT_RANGE": f"{PORT_RANGE[0]},{PORT_RANGE[1]}",
        "STOCKROOM_QUOTA": str(QUOTA),
        "STOCKROOM_MEMORY_QUOTA": MEMORY_BUDGET,
        "STOCKROOM_MEMORY_BUDGET": MEMORY_BUDGET,
        "DATABASE_URL": database_url or f"sqlite:///{DATA_DIR / 'portal.sqlite3'}",
        "STOCKROOM_BACKEND": "local",
        # No warm pool but in section 8, which runs a stack of its own with one: the other sections
        # measure the cold path, and the reconcile passes count only the instances they made.
        "STOCKROOM_POOL_MYSQL": "0",
        "STOCKROOM_POOL_REDIS": "0",
        # No first scheduled backup of the instances the bench keeps for a while: it would run
        # beside the measurements (section 6 takes the snapshots it times itself).
        "STOCKROOM_FIRST_BACKUP_AFTER": "86400",
        # No before-delete snapshots: the bench's instances hold nothing worth keeping, and the
        # reconcile section deletes 1,000 of them at the end (a snapshot each took minutes in all).
        "STOCKROOM_SNAPSHOT_KEEP_DAYS": "0",
        "LOG_LEVEL": "WARNING",
    }


def limits() -> str:
    """The limits the bench sets for itself, for its output."""
    return (
        f"STOCKROOM_PORT_RANGE={PORT_RANGE[0]},{PORT_RANGE[1]} ({PORT_RANGE[1] - PORT_RANGE[0] + 1} ports),"
        f" STOCKROOM_QUOTA={QUOTA} instances per user, STOCKROOM_MEMORY_BUDGET={MEMORY_BUDGET}"
        f" and STOCKROOM_MEMORY_QUOTA={MEMORY_BUDGET}"
    )


def run_as_kwargs() -> dict:
    """Popen arguments that run a child as RUN_AS when we are root (servers refuse root)."""
    if os.geteuid() != 0:
        return {}
    account = pwd.getpwnam(RUN_AS)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def give_to_run_as(path: Path) -> None:
    if os.geteuid() == 0:
        account = pwd.getpwnam(RUN_AS)
        os.chown(path, account.pw_uid, account.pw_gid)


def wait_until(ready: Callable[[], bool], *, timeout: float, what: str, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} was not ready within {timeout:g} s")
        time.sleep(interval)


def accepts_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Service:
    """One long-running process: how to start it and how to tell that it is ready."""

    name: str
    argv: list[str]
    ready: Callable[[], bool]
    env: dict[str, str] | None = None
    popen: dict = field(default_factory=dict)
    stop_signal: int = signal.SIGTERM
    process: subprocess.Popen | None = None

    def start(self, *, timeout: float = 60) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / f"{self.name}.log", "ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                cwd=BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only the bench, which then stops these in order
                **self.popen,
            )

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {LOG_DIR}/{self.name}.log")
            return self.ready()

        wait_until(ready, timeout=timeout, what=self.name, interval=0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def running(*services: Service) -> Iterator[None]:
    """Start `services` in order; stop the ones that started, in reverse order, however we leave."""
    started: list[Service] = []
    try:
        for service in services:
            started.append(service)
            service.start()
        yield
    finally:
        for service in reversed(started):
            service.stop()


def _log_says(name: str, text: str) -> Callable[[], bool]:
    path = LOG_DIR / f"{name}.log"
    return lambda: path.exists() and text in path.read_text(errors="replace")


def broker() -> Service:
    """The broker, with its password in a config file (0600, in a 0700 folder): none on its
    command line, none in its environment."""
    directory = DATA_DIR / "broker"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    config = directory / "redis.conf"
    config.touch(mode=0o600)
    config.chmod(0o600)
    config.write_text(
        f'bind 127.0.0.1\nport {BROKER_PORT}\ndir "{directory}"\nsave ""\nappendonly no\n'
        f'requirepass "{BROKER_PASSWORD}"\n'
    )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    return Service("broker", ["redis-server", str(config)], lambda: accepts_connections(BROKER_PORT), env=env)


def worker(env: dict[str, str], *, concurrency: int) -> Service:
    """A Celery worker without beat: the only reconcile passes are the ones the bench times."""
    log = LOG_DIR / "worker.log"
    log.unlink(missing_ok=True)  # so "ready." below is this run's
    argv = [sys.executable, "-m", "celery", "-A", "portal", "worker", "--concurrency", str(concurrency)]
    argv += ["--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    return Service("worker", argv, _log_says("worker", " ready."), env=env)


def web(env: dict[str, str]) -> Service:
    """gunicorn as `make run` starts it: 2 workers with 4 threads each."""
    argv = [sys.executable, "-m", "gunicorn", "portal.wsgi", "--bind", f"127.0.0.1:{WEB_PORT}"]
    argv += ["--workers", "2", "--threads", "4", "--graceful-timeout", "3"]
    return Service("web", argv, lambda: accepts_connections(WEB_PORT), env=env)


# PostgreSQL ---------------------------------------------------------------------------


def postgres_cluster() -> AbstractContextManager[str | None]:
    """A throwaway PostgreSQL cluster on 127.0.0.1:POSTGRES_PORT (None if not installed); see devtools."""
    return postgres.postgres_cluster(POSTGRES_PORT, prefix="stockroom-bench-pg-")
