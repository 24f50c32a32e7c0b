"""`make run`'s runner (`python -m portal.runner`): the broker, worker, beat and gunicorn, kept up.

A component that dies is started again after 1 s, then 2, 4 … up to 30 s while it keeps dying
soon after each start (the count starts afresh once it has stayed up for a minute). Each exit and
restart is logged, and written to DATA_DIR/runner.json, which /healthz reads. Only SIGINT or
SIGTERM to the runner stops everything: every component's whole process group, so no Celery pool
process outlives it.

The broker requires the password from .env (STOCKROOM_BROKER_PASSWORD, or one in
CELERY_BROKER_URL). redis-server reads it from a config file in DATA_DIR/broker (0700; the file
0600); it is on no command line and in no environment. Portal processes get the runner's own
environment, which holds none of .env's secrets (settings reads .env into a copy, not into
os.environ): each reads .env itself.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django.setup()

from django.conf import settings  # noqa: E402 - once Django is set up

from provisioning.backends.processes import ENVIRONMENT  # noqa: E402
from provisioning.health import RUNNER_STATE  # noqa: E402

BACKOFF_FIRST, BACKOFF_MAX = 1.0, 30.0
STABLE_SECONDS = 60.0  # up this long, a component's next death is its first again
STOP_GRACE = 10.0  # seconds a component has to stop after SIGTERM before its group is killed


@dataclass
class Component:
    """One long-running process of the portal, restarted whenever it dies."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None  # None: the runner's own environment
    process: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0  # deaths in a row, each soon after its start
    restarts: int = 0
    restart_at: float | None = None
    last_exit: str | None = None
    last_exit_at: str | None = None
    log: Path | None = None

    def start(self) -> None:
        output = self.log.open("ab") if self.log else None
        try:
            self.process = subprocess.Popen(
                self.argv,
                cwd=settings.BASE_DIR,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
                start_new_session=True,  # its own process group: Ctrl-C reaches the runner only
            )
        finally:
            if output:
                output.close()
        self.started, self.restart_at = time.monotonic(), None

    def signal_group(self, signum: int) -> None:
        """Signal the component's whole process group (a Celery pool, gunicorn's workers), which
        outlives its leader if the leader was killed."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass


def _count(name: str, default: int, *, least: int = 1, why: str = "") -> str:
    """The whole number in the environment variable `name` (`default` if unset), at least `least`."""
    value = os.environ.get(name, str(default))
    if not (value.isascii() and value.isdigit() and int(value) >= least):
        because = f", one more than {why}" if why else ""
        raise SystemExit(f"{name}={value!r}: expected a whole number from {least}{because}.")
    return value


def components(*, port: int, broker_config: Path, concurrency: int) -> list[Component]:
    """What `make run` keeps running, in start order (they stop in reverse). One line each."""
    python, portal_env = sys.executable, {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings"}
    celery = [python, "-m", "celery", "-A", "portal"]
    return [
        Component("broker", ["redis-server", str(broker_config)], env=dict(ENVIRONMENT)),
        Component("worker", [*celery, "worker", "--loglevel", "INFO", "--concurrency", str(concurrency)], portal_env),
        # Webhook deliveries have a queue and pool of their own, so slow receivers cannot hold the worker.
        Component(
            "webhooks",
            [
                *celery,
                "worker",
                "-Q",
                "webhooks",
                "-n",
                "webhooks@%h",
                "--loglevel",
                "INFO",
                "--concurrency",
                os.environ.get("WEBHOOK_CONCURRENCY", "4"),
            ],
            portal_env,
        ),  # fmt: skip
        Component("beat", [*celery, "beat", "--loglevel", "INFO"], portal_env),
        Component(
            "web",
            [
                python,
                "-m",
                "gunicorn",
                "portal.wsgi",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                _count("WEB_WORKERS", 2),
                "--threads",
                # Requests waiting for an instance (?wait=) must never hold every thread of a worker.
                _count(
                    "WEB_THREADS", 4, least=settings.STOCKROOM_WAITING_REQUESTS + 1, why="STOCKROOM_WAITING_REQUESTS"
                ),
                "--graceful-timeout",
                "3",
                "--access-logfile",
                "-",
            ],  # fmt: skip
            portal_env,
        ),
    ]


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker `make run` starts listens: a Unix socket (the default) or a loopback port."""

    password: str
    socket: Path | None = None
    port: int | None = None

    def answers(self) -> bool:
        return accepts_connections(self.socket if self.socket else self.port)


def broker_address() -> BrokerAddress:
    """Where the broker listens, and its password, from the settings."""
    url = urlsplit(settings.CELERY_BROKER_URL)
    password = unquote(url.password or "") or settings.CELERY_BROKER_PASSWORD or ""
    if not password:
        raise SystemExit("The broker needs a password: set STOCKROOM_BROKER_PASSWORD (make run writes it to .env).")
    if any(c.isspace() or c in "\"'\\" for c in password):
        raise SystemExit("STOCKROOM_BROKER_PASSWORD may not contain spaces, quotes or backslashes.")
    if url.scheme == "redis+socket" and url.path:
        return BrokerAddress(password, socket=Path(url.path))
    if url.scheme == "redis" and url.hostname in ("127.0.0.1", "localhost"):
        return BrokerAddress(password, port=url.port or 6379)
    raise SystemExit(
        "The runner starts a Redis broker on a Unix socket (redis+socket:///path) or on 127.0.0.1; "
        f"CELERY_BROKER_URL is {url.scheme}://…"
    )


def write_broker_config(folder: Path, address: BrokerAddress) -> Path:
    """redis.conf for the broker, password included, in a folder only the portal's user may enter.
    On a Unix socket (the default) it has no TCP port at all: nobody else on the host can take its
    place and be sent the password, as anyone may bind a free loopback port while the broker is down.
    The broker keeps an append-only file, so queued jobs survive its restart."""
    folder.mkdir(mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    config = folder / "redis.conf"
    where = (
        ["port 0", f'unixsocket "{address.socket}"', "unixsocketperm 700"]
        if address.socket
        else ["bind 127.0.0.1", f"port {address.port}"]
    )
    text = "\n".join(
        [
            *where,
            f'dir "{folder}"',
            'save ""',
            "appendonly yes",
            f'logfile "{folder / "broker.log"}"',
            f'requirepass "{address.password}"',
            "",
        ]
    )
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    return config


def make_private(data_dir: Path, *, keep_traversable: bool) -> None:
    """Tighten an existing install: DATA_DIR 0700 (0711 while instance servers, each its own
    uid, live below it and must pass through), and nothing in it (instances and Docker volumes
    aside: their backends set their modes) readable or writable by group or others."""
    os.chmod(data_dir, 0o711 if keep_traversable else 0o700)
    docker: dict = settings.STOCKROOM_BACKENDS["docker"]
    volumes = docker["OPTIONS"]["volume_root"]
    skip = {Path(settings.STOCKROOM_INSTANCES_DIR), Path(volumes), Path(settings.STATIC_ROOT)}
    for parent, folders, names in os.walk(data_dir):
        folders[:] = [name for name in folders if Path(parent, name) not in skip]
        for name in (*folders, *names):
            path = os.path.join(parent, name)
            info = os.lstat(path)
            if info.st_uid == os.geteuid() and not os.path.islink(path) and info.st_mode & 0o077:
                os.chmod(path, info.st_mode & 0o700)


def accepts_connections(where: int | Path | None) -> bool:
    """Whether something listens on loopback port `where`, or on the Unix socket at `where`."""
    try:
        if isinstance(where, Path):
            with socket.socket(socket.AF_UNIX) as client:
                client.settimeout(1)
                client.connect(str(where))
        else:
            socket.create_connection(("127.0.0.1", where), timeout=1).close()
    except OSError:
        return False
    return True


def bindable(port: int) -> bool:
    """Whether nobody listens on loopback port `port`: found by binding it, not by connecting,
    which would tell a stranger listening there that the portal is starting."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no listener
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Runner:
    """Starts the components, restarts the ones that die, stops them all on SIGINT or SIGTERM."""

    def __init__(self, *, port: int, concurrency: int, logs: Path | None):
        self.port = port
        data_dir = Path(settings.DATA_DIR)
        instances = Path(settings.STOCKROOM_INSTANCES_DIR)
        legacy = os.geteuid() == 0 and instances.is_relative_to(data_dir) and any(instances.glob("*/*"))
        make_private(data_dir, keep_traversable=legacy)
        env_file = Path(settings.BASE_DIR) / ".env"
        if env_file.exists():
            os.chmod(env_file, 0o600)
        self.broker = broker_address()
        config = write_broker_config(data_dir / "broker", self.broker)
        self.state_file = data_dir / RUNNER_STATE
        self.components = components(port=port, broker_config=config, concurrency=concurrency)
        self.stop_leftovers()
        taken = [port for port in (port, self.broker.port) if port and not bindable(port)]
        if taken:  # whoever holds them would be sent sign-ins, or the broker's password
            raise SystemExit(
                f"Port {', '.join(map(str, taken))} on 127.0.0.1 is held by another process; stop it or "
                "choose another (PORT=…). The runner does not start next to a stranger."
            )
        if logs:
            logs.mkdir(mode=0o700, parents=True, exist_ok=True)
            for component in self.components:
                component.log = logs / f"{component.name}.log"
        self.stopping = threading.Event()

    def stop_leftovers(self) -> None:
        """Components a runner that was killed (kill -9, not Ctrl-C) left running: their groups are
        killed, so the new ones get their ports. Only a process that still runs the component's
        program and leads its own process group, as the runner started it, is taken for it."""
        try:
            old = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        programs = {c.name: os.path.realpath(shutil.which(c.argv[0]) or c.argv[0]) for c in self.components}
        for name, component in old.get("components", {}).items():
            pid = component.get("pid")
            try:
                runs = os.path.realpath(f"/proc/{pid}/exe") == programs.get(name) and os.getpgid(pid) == pid
            except (OSError, TypeError):
                continue
            if runs:
                self.say(f"stopping the {name} (pid {pid}) that an earlier runner left running.")
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:  # its ports free
                    time.sleep(0.05)

    def run(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: self.stopping.set())
        try:
            self.start_all()
            while not self.stopping.wait(0.2):
                self.tend()
        finally:
            self.stop_all()

    @staticmethod
    def say(message: str) -> None:
        print(f"{now_iso()} runner: {message}", file=sys.stderr, flush=True)

    def start_all(self) -> None:
        for component in self.components:
            if self.stopping.is_set():
                return
            component.start()
            if component.name == "broker":  # the others retry, but start quieter once it answers
                deadline = time.monotonic() + 10
                while not self.broker.answers() and time.monotonic() < deadline:
                    time.sleep(0.05)
        self.write_state()
        self.say(f"Stockroom is on http://127.0.0.1:{self.port} (API docs: /api/docs). Ctrl-C stops it.")

    def tend(self) -> None:
        """One look at every component: note the ones that died, start the ones whose wait is over."""
        changed = False
        now = time.monotonic()
        for component in self.components:
            process = component.process
            if process is not None and component.restart_at is None and process.poll() is not None:
                component.signal_group(signal.SIGKILL)  # whatever of it is left (pool processes)
                up = now - component.started
                component.failures = 1 if up >= STABLE_SECONDS else component.failures + 1
                delay = min(BACKOFF_FIRST * 2 ** (component.failures - 1), BACKOFF_MAX)
                component.restart_at = now + delay
                component.last_exit, component.last_exit_at = describe_exit(process.returncode), now_iso()
                self.say(
                    f"{component.name} (pid {process.pid}) {component.last_exit} after {up:.1f} s; "
                    f"starting it again in {delay:g} s."
                )
                changed = True
            elif component.restart_at is not None and now >= component.restart_at:
                component.restarts += 1
                changed = True
                try:
                    component.start()
                except OSError as exc:  # its program is gone, say: try again after the longest wait
                    component.restart_at = now + BACKOFF_MAX
                    self.say(f"{component.name} could not be started ({exc}); trying again in {BACKOFF_MAX:g} s.")
                    continue
                pid = component.process.pid if component.process else None
                self.say(f"{component.name} started again (pid {pid}, restart {component.restarts}).")
        if changed:
            self.write_state()

    def stop_all(self) -> None:
        """SIGTERM every component's group, the broker last (the others may still use it); SIGKILL
        what is left of each after STOP_GRACE."""
        self.say("stopping.")
        broker, others = self.components[0], self.components[:0:-1]
        for component in others:
            component.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for component in others:
            self._wait(component, deadline)
        broker.signal_group(signal.SIGTERM)
        self._wait(broker, time.monotonic() + STOP_GRACE)
        self.state_file.unlink(missing_ok=True)

    @staticmethod
    def _wait(component: Component, deadline: float) -> None:
        process = component.process
        if process is None:
            return
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        component.signal_group(signal.SIGKILL)  # stragglers, and pool processes of a killed leader
        process.wait()

    def write_state(self) -> None:
        state = {
            "pid": os.getpid(),
            "written_at": now_iso(),
            "components": {
                c.name: {
                    "pid": c.process.pid if c.process else None,
                    "up": c.restart_at is None and c.process is not None and c.process.poll() is None,
                    "restarts": c.restarts,
                    "last_exit": c.last_exit,
                    "last_exit_at": c.last_exit_at,
                }
                for c in self.components
            },
        }
        temporary = self.state_file.with_suffix(".new")
        temporary.write_text(json.dumps(state, indent=1))
        temporary.replace(self.state_file)


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the portal; restart any part that dies; Ctrl-C stops all.")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")), help="gunicorn's port")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("WORKER_CONCURRENCY", "8")))
    parser.add_argument("--logs", type=Path, default=None, help="a folder for one log per component")
    arguments = parser.parse_args()
    Runner(port=arguments.port, concurrency=arguments.concurrency, logs=arguments.logs).run()


if __name__ == "__main__":
    main()
