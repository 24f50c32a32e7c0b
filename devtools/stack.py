"""A portal started the way `make run` starts it (`python -m portal.runner`), in a folder of its
own, on ports of its own: for the control-plane tests and the soak (bench/soak.py).

Everything it starts is stopped by PID, and `remove()` takes away every instance it left, the
filesystems its backend keeps ready, and its uid claims.
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

# Run with the stack's settings: give back what its local backend keeps on the host.
_REMOVE_INSTANCES = """
import shutil, django
django.setup()
from django.conf import settings
from provisioning.backends.base import get_backend
from provisioning.backends.local import kill_processes_under
backend = get_backend("local")
for key in backend.orphans(set()):
    backend.remove_orphan(key)
backend.forget_ready()
root = settings.STOCKROOM_INSTANCES_DIR
if root.exists():
    kill_processes_under(root)
    shutil.rmtree(root, ignore_errors=True)
print(root)
"""

_MAKE_USER = """
import django
django.setup()
from django.contrib.auth.models import User
from provisioning.services.tokens import create_token
# Staff, so that its token also sees /healthz's checks.
user = User.objects.create_user("soak", password="soak-" + "x" * 20, is_staff=True)
print(create_token(owner=user, name="stack")[1])
"""


class Stack:
    """One portal: broker, worker, beat and gunicorn under the runner, with its own DATA_DIR."""

    def __init__(
        self,
        root: Path,
        *,
        web_port: int,
        broker_port: int | None = None,
        port_range: tuple[int, int],
        concurrency: int = 2,
        env: dict[str, str] | None = None,
    ):
        self.root, self.web_port, self.broker_port = root, web_port, broker_port
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.concurrency = concurrency
        self.password = secrets.token_urlsafe(24)
        self.env = (
            {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(("STOCKROOM_", "CELERY_", "DJANGO_", "DATABASE_", "PYTEST_"))
                and key not in ("SECRET_KEY", "DATA_DIR", "DEBUG")
            }
            | {
                "DJANGO_SETTINGS_MODULE": "portal.settings",
                "DEBUG": "False",
                "SECRET_KEY": secrets.token_urlsafe(48),
                "STOCKROOM_ENCRYPTION_KEYS": secrets.token_urlsafe(48),
                "STOCKROOM_BROKER_PASSWORD": self.password,
                "DATA_DIR": str(self.data_dir),
                "DATABASE_URL": f"sqlite:///{self.data_dir / 'portal.sqlite3'}",
                # None: the runner's default, a Unix socket in DATA_DIR/broker.
                **({"CELERY_BROKER_URL": f"redis://127.0.0.1:{broker_port}/0"} if broker_port else {}),
                "STOCKROOM_PORT_RANGE": f"{port_range[0]},{port_range[1]}",
                "STOCKROOM_RECONCILE_INTERVAL": "2",
                "LOG_LEVEL": "INFO",
            }
            | (env or {})
        )
        self.runner: subprocess.Popen | None = None
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def python(self, code: str) -> str:
        result = subprocess.run(
            [sys.executable, "-c", code], cwd=BASE_DIR, env=self.env, capture_output=True, text=True, check=False
        )
        if result.returncode:
            raise RuntimeError(result.stderr)
        return result.stdout.strip()

    def prepare(self) -> None:
        """The database and a user with an API token (as `make run` migrates before it starts)."""
        self.root.mkdir(parents=True, exist_ok=True)
        manage = [sys.executable, "manage.py"]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], cwd=BASE_DIR, env=self.env, check=True)
        self.token = self.python(_MAKE_USER)

    def start(self) -> None:
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.runner = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "portal.runner",
                "--port",
                str(self.web_port),
                "--logs",
                str(self.logs),
                "--concurrency",
                str(self.concurrency),
            ],  # fmt: skip
            cwd=BASE_DIR,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=(self.logs / "runner.log").open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait(self.all_up, 60, "every component to start")
        self.wait(lambda: self.answers(), 60, "gunicorn")

    def all_up(self) -> bool:
        """Whether this runner (not one before it) says every component is up."""
        state = self.state()
        mine = self.runner is not None and state.get("pid") == self.runner.pid
        return mine and all(component["up"] for component in state["components"].values())

    def state(self) -> dict:
        try:
            return json.loads((self.data_dir / "runner.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # it answers; a 503 names what is down
        except OSError:
            return False

    def wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.runner is not None and self.runner.poll() is not None:
                raise RuntimeError(f"the runner exited ({self.runner.returncode}); see {self.logs}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}; see {self.logs}")
            time.sleep(0.1)

    def group_pids(self) -> set[int]:
        """The runner and every process in the process groups of its components."""
        groups = {c["pid"] for c in self.state().get("components", {}).values() if c["pid"]}
        found = {self.runner.pid} if self.runner else set()
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(entry.path, "stat").read_text().rpartition(")")[2].split()
                except OSError:
                    continue
                if int(fields[2]) in groups:  # its process group
                    found.add(int(entry.name))
        return found

    def stop(self, timeout: float = 30) -> float:
        """Ctrl-C: SIGINT to the runner. Returns how long it took to exit."""
        if self.runner is None or self.runner.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.runner.send_signal(signal.SIGINT)
        try:
            self.runner.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.runner.pid, signal.SIGKILL)
            self.runner.wait()
            raise
        return time.monotonic() - started

    def remove(self) -> None:
        """Whatever the stack's backend left on the host, then its folder."""
        self.python(_REMOVE_INSTANCES)
        shutil.rmtree(self.root, ignore_errors=True)


def free_port(ports: range) -> int:
    """The first port of `ports` nothing listens on."""
    for port in ports:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports}")
