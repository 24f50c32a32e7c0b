"""Personas and helpers. alice owns instances, charlie is an outsider."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import standardwebhooks
from django.conf import settings
from django.db import connection
from rest_framework.test import APIClient

from devtools.stack import free_port
from provisioning.backends.base import get_backend
from provisioning.backends.local import kill_processes_under
from provisioning.engines.redis import NO_RETRY
from provisioning.services.tokens import create_token


def pytest_report_header(config) -> str:
    database = settings.DATABASES["default"]
    test_name = database.get("TEST", {}).get("NAME") or f"test_{database['NAME']}"
    if connection.vendor == "sqlite":
        return f"database: SQLite, {test_name}"
    return f"database: {database['ENGINE'].rsplit('.', 1)[1]} at {database['HOST']}:{database['PORT']}, {test_name}"


def database_url() -> str:
    """DATABASE_URL for another process that must see the test database (which Django
    names at set-up, e.g. test_postgres), whichever database the suite runs on."""
    database = settings.DATABASES["default"]
    if connection.vendor == "sqlite":
        return f"sqlite:///{database['NAME']}"
    assert connection.vendor == "postgresql", "the tests run on SQLite or PostgreSQL"
    login = quote(database["USER"], safe="")
    if database["PASSWORD"]:
        login += ":" + quote(database["PASSWORD"], safe="")
    return f"postgres://{login}@{database['HOST']}:{database['PORT']}/{quote(database['NAME'], safe='')}"


def client_for(user) -> APIClient:
    """An API client with a new token of `user`; its secret is `client.token`."""
    client = APIClient()
    client.token = create_token(owner=user, name="tests")[1]
    client.credentials(HTTP_AUTHORIZATION=f"Token {client.token}")
    return client


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="correct-horse-battery")


@pytest.fixture
def charlie(django_user_model):
    return django_user_model.objects.create_user("charlie", password="charlie-staple-42")


@pytest.fixture
def api(alice) -> APIClient:
    return client_for(alice)


@pytest.fixture
def outsider(charlie) -> APIClient:
    return client_for(charlie)


def wait_for_status(api: APIClient, kind: str, pk: int, *wanted: str, timeout: float = 60) -> dict:
    """Poll the API until the instance reaches one of `wanted` (or 404 for "gone")."""
    deadline = time.monotonic() + timeout
    while True:
        response = api.get(f"/api/storage/{kind}/instances/{pk}")
        if response.status_code == 404 and "gone" in wanted:
            return {}
        body = response.json()
        if body.get("status") in wanted:
            return body
        assert time.monotonic() < deadline, f"still {body} after {timeout} s"
        time.sleep(0.05)


def port_refuses(port: int) -> bool:
    if not isinstance(port, int):  # None would "refuse" too: port 0 never answers
        raise TypeError(f"port_refuses() needs a port number, not {port!r}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def instance_dir(kind: str, pk: int):
    return settings.STOCKROOM_INSTANCES_DIR / kind / str(pk)


def server_dir(kind: str, pk: int):
    """Where the instance's server writes: its data, log and socket."""
    return instance_dir(kind, pk) / "server"


@pytest.fixture(scope="session", autouse=True)
def stop_leftover_servers():
    """Whatever a failing test left running is stopped at the end, so CI leaves nothing behind:
    every local instance is an orphan once the test database is gone."""
    yield
    root = settings.STOCKROOM_INSTANCES_DIR
    if root.exists():
        backend = get_backend("local")
        for key in backend.orphans(set()):
            backend.remove_orphan(key)
        backend.forget_ready()
        kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)
    # The snapshots of instances whose database is gone (under DATA_DIR=var/test, the tests' own).
    for path in settings.STOCKROOM_SNAPSHOT_DIR.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def queued_for_real():
    """Send tasks to the broker instead of running them in the test process."""
    from portal.celery import app

    app.conf.task_always_eager = False
    yield app
    app.conf.task_always_eager = True


def broker_port() -> int:
    return int(settings.CELERY_BROKER_URL.rsplit(":", 1)[1].split("/")[0])


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_broker(folder: Path, port: int, password: str) -> subprocess.Popen:
    """A broker as `make run` starts one: its password in a config file of its own (0600, in a
    0700 folder), never on its command line or in its environment."""
    folder.mkdir(mode=0o700, exist_ok=True)
    config = folder / "redis.conf"
    config.write_text(f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly no\nrequirepass "{password}"\n')
    config.chmod(0o600)
    with open(folder / "server.log", "wb") as log:
        return subprocess.Popen(
            ["redis-server", str(config)],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={"PATH": os.environ["PATH"]},
        )


@pytest.fixture
def broker(tmp_path):
    port = broker_port()
    server = start_broker(tmp_path / "broker", port, settings.CELERY_BROKER_PASSWORD)
    client = redis.Redis(port=port, password=settings.CELERY_BROKER_PASSWORD, retry=NO_RETRY)

    def answers() -> bool:
        if server.poll() is not None:
            log = (tmp_path / "broker" / "server.log").read_text(errors="replace").strip().splitlines()[-3:]
            pytest.fail(f"The test broker on port {port} exited ({server.returncode}): {' | '.join(log)}")
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, "the broker")
    yield
    server.terminate()
    server.wait(10)


class Worker:
    """`celery worker` against the test database; with beat=True it also runs the reconciler.

    It consumes the default queue and the webhooks queue, unless told `queues` (as `-Q`): `make run`
    starts one worker for each, and tests that are about that split do too."""

    def __init__(
        self,
        log: Path,
        *,
        beat: bool = False,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        queues: str | None = "celery,webhooks",
    ):
        self.log = log
        self.beat = beat
        self.concurrency = concurrency
        self.env = env or {}
        self.queues = queues
        self.process: subprocess.Popen | None = None

    def start(self, **env: str) -> None:
        argv = [sys.executable, "-m", "celery", "-A", "portal", "worker", "--concurrency", str(self.concurrency),
                "-n", f"{self.log.stem}@%h",
                "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"]  # fmt: skip
        if self.queues is not None:  # None: what a worker started without -Q consumes
            argv += ["-Q", self.queues]
        if self.beat:
            argv += ["--beat", "--schedule", str(self.log.with_suffix(".beat"))]
        self.process = subprocess.Popen(
            argv,
            cwd=settings.BASE_DIR,
            # The test process runs tasks inline (pytest.ini); a real worker must queue them, or beat
            # would run each reconcile pass itself, in a process forked from the worker.
            env=os.environ | {"DATABASE_URL": database_url(), "CELERY_TASK_ALWAYS_EAGER": "False"} | self.env | env,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # kill() takes the pool processes too
        )
        wait_until(lambda: " ready." in self.log.read_text(), 60, "the worker")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.write_text("")

    def kill(self) -> None:
        """What a crash or an OOM kill does: no clean-up, tasks left half done."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)
        self.log.write_text("")


@pytest.fixture
def worker(broker, queued_for_real, tmp_path):
    worker = Worker(tmp_path / "worker.log")
    worker.start()
    yield worker
    if worker.process.poll() is None:
        worker.stop()


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it gets and can be told to fail."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        self.attempts: list[dict] = []  # the headers of every request, failed ones included
        self.paths: list[str] = []  # the request target of every request, as it came
        self.failures_left = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts.append(dict(self.headers))
                receiver.paths.append(self.path)
                if receiver.failures_left > 0:
                    receiver.failures_left -= 1
                    self.send_response(503)
                else:
                    receiver.received.append((dict(self.headers), body))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", receiver_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/stockroom"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[dict]:
        return [json.loads(body) for _, body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def verify(secret: str, headers: dict, body: bytes) -> bool:
    """What a receiver does, with the Standard Webhooks reference library (not our own code):
    the signature over id, timestamp and body, and a timestamp at most 5 minutes off."""
    try:
        standardwebhooks.Webhook(secret).verify(body, headers)
    except standardwebhooks.webhooks.WebhookVerificationError:
        return False
    return True


def connects_as(uid: int, path: Path) -> str:
    """What a process of `uid` on the host gets when it connects to the Unix socket at `path`."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child tries, and reports through the pipe
        try:
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(path))
            outcome = "connected"
        except OSError as exc:
            outcome = type(exc).__name__
        os.write(write, outcome.encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read) as pipe:
        return pipe.read()


def receiver_port() -> int:
    """A free loopback port for a test's HTTP receiver: from STOCKROOM_TEST_HTTP_PORTS ("first,last")
    when set, so that parallel runs stay in their own ranges, else 0 (the kernel picks)."""
    ports = os.environ.get("STOCKROOM_TEST_HTTP_PORTS")
    if not ports:
        return 0
    first, _, last = ports.partition(",")
    return free_port(range(int(first), int(last or first) + 1))


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (the kernel picks it, then it is let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
