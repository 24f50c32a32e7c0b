"""Issue 12, the control plane: the attacks of a local user on the portal's own parts, and the
parts dying under it. Each test replays one, against real servers."""

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from django.conf import settings

from devtools.stack import Stack, free_port
from provisioning.backends import processes
from provisioning.backends.base import get_backend
from provisioning.backends.local import processes_under
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance

from .conftest import broker_port, connects_as, instance_dir, port_refuses, server_dir, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SECRETS = ("SECRET_KEY", "STOCKROOM_ENCRYPTION_KEYS", "STOCKROOM_BROKER_PASSWORD", "DATABASE_URL")


def secret_values() -> list[bytes]:
    """This test process's secrets, as a child that inherited its environment would show them."""
    values = [settings.SECRET_KEY, *settings.STOCKROOM_ENCRYPTION_KEYS, settings.CELERY_BROKER_PASSWORD]
    return [value.encode() for value in values if value]


def environ_of(pid: int) -> dict[bytes, bytes]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.split(b"=", 1) for entry in raw.split(b"\0") if b"=" in entry)


def running(api, kind: str) -> tuple[int, dict]:
    pk = api.post(f"/api/storage/{kind}/instances", {}).json()["id"]
    body = wait_for_status(api, kind, pk, "running", "failed")
    assert body["status"] == "running", body["status_message"]
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def delete(api, kind: str, pk: int) -> None:
    assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    wait_for_status(api, kind, pk, "gone")


# The broker --------------------------------------------------------------------------------


def test_an_unauthenticated_client_of_the_broker_is_refused(broker):
    """Issue 12, attack 1: any local user could SHUTDOWN the broker, or push tasks into it."""
    stranger = redis.Redis(port=broker_port(), retry=NO_RETRY)
    for command in (("PING",), ("SHUTDOWN", "NOSAVE"), ("LPUSH", "celery", "{}"), ("CLIENT", "PAUSE", "10000")):
        with pytest.raises(redis.AuthenticationError):
            stranger.execute_command(*command)
    # Without a client library's handshake, the same: every command is refused.
    with socket.create_connection(("127.0.0.1", broker_port()), timeout=5) as raw:
        raw.sendall(b"SHUTDOWN NOSAVE\r\n")
        assert raw.recv(200).startswith(b"-NOAUTH Authentication required")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=broker_port(), password="guessed", retry=NO_RETRY).ping()

    portal = redis.Redis(port=broker_port(), password=settings.CELERY_BROKER_PASSWORD, retry=NO_RETRY)
    assert portal.ping() and portal.llen("celery") == 0


def test_the_portal_reaches_its_broker_with_the_password(admin_client, worker):
    """Celery (the web side and the worker) and /healthz use the password from the settings."""
    checks = admin_client.get("/healthz").json()["checks"]
    assert checks["broker"] == {"ok": True, "detail": "Reachable.", "ms": checks["broker"]["ms"]}
    assert checks["workers"]["ok"], checks["workers"]  # the worker reached the broker, with the password


# Child processes ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_instance_servers_inherit_no_secret(api, kind):
    """Issue 12, hygiene: servers run as the instance's user, which may read its own environ."""
    assert all(os.environ.get(name) for name in ("SECRET_KEY", "STOCKROOM_ENCRYPTION_KEYS")), "nothing to leak"
    pk, _ = running(api, kind)
    (pid,) = processes_under(instance_dir(kind, pk))
    environment = environ_of(pid)
    assert set(environment) <= {b"PATH", b"LANG", b"LC_ALL"}, environment.keys()
    for value in secret_values():
        assert value not in Path(f"/proc/{pid}/environ").read_bytes()
        assert value not in Path(f"/proc/{pid}/cmdline").read_bytes()
    delete(api, kind, pk)


def test_helpers_the_backend_runs_get_a_minimal_environment(tmp_path):
    """What mariadb-install-db (and every program an engine runs through the Host protocol) gets."""
    os.chmod(tmp_path, 0o777)  # the unprivileged template builder must get in when we are root
    result = get_backend("local").run(["/usr/bin/env"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = {line.split("=", 1)[0] for line in result.stdout.splitlines()}
    assert names == {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
    assert not any(value.decode() in result.stdout for value in secret_values())


# A server that dies while it starts --------------------------------------------------------


@pytest.fixture
def killed_at_start(monkeypatch):
    """kill -9 the instance's server right after it was started, `times` times; a marker left in
    its data folder shows whether the next try began from a clean slate."""
    spawn, kills = processes.spawn, {"left": 0, "done": 0}

    def spawn_then_kill(argv, *, cwd, **kwargs):
        spawn(argv, cwd=cwd, **kwargs)
        if kills["left"]:
            kills["left"] -= 1
            (cwd / "server" / "left-by-the-first-try").write_text("stale")
            for pid in processes_under(cwd):
                os.kill(pid, signal.SIGKILL)
            kills["done"] += 1

    monkeypatch.setattr(processes, "spawn", spawn_then_kill)
    return kills


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_server_killed_while_starting_is_started_again_from_a_clean_slate(api, killed_at_start, kind, caplog):
    killed_at_start["left"] = 1
    pk, config = running(api, kind)
    assert killed_at_start["done"] == 1
    assert not (server_dir(kind, pk) / "left-by-the-first-try").exists()
    assert f"Instance {pk}: The server died while starting" in caplog.text
    assert "starting it again from a clean slate" in caplog.text
    if kind == "redis":
        client = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
        assert client.dbsize() == 0  # fresh data
        client.set("after", "the second start")
        assert client.get("after") == b"the second start"
        client.close()
    delete(api, kind, pk)


def test_a_server_killed_twice_while_starting_fails_the_create_cleanly(api, killed_at_start):
    killed_at_start["left"] = 2
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    body = wait_for_status(api, "redis", pk, "failed", "running")
    assert body["status"] == "failed"
    assert body["status_message"].startswith("Provisioning failed, on its second try: The server exited during")
    assert killed_at_start["done"] == 2
    instance = Instance.objects.get(pk=pk)
    assert instance.port is None and not instance.holds_data
    assert not instance_dir("redis", pk).exists()
    assert not processes_under(instance_dir("redis", pk))


# The runner: make run's stack, its parts killed ---------------------------------------------


@pytest.fixture
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    data = root / "data"
    # An install from before: DATA_DIR 0755 with a world-readable log in it.
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    (data / "old.log").write_text("written before umask 077")
    os.chmod(data / "old.log", 0o644)
    stack = Stack(
        root,
        web_port=free_port(range(33800, 33850)),
        port_range=(settings.STOCKROOM_PORT_RANGE[1] - 49, settings.STOCKROOM_PORT_RANGE[1]),  # the suite's last 50
    )
    stack.prepare()
    stack.start()
    yield stack
    try:
        stack.stop()
    finally:
        stack.remove()


def api_call(stack: Stack, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        stack.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Token {stack.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read()
            return response.status, json.loads(text) if text else {}
    except urllib.error.HTTPError as error:
        return error.code, {}


def health_checks(stack: Stack) -> dict:
    """/healthz's checks, as staff sees them; {} while gunicorn does not answer."""
    request = urllib.request.Request(f"{stack.url}/healthz", headers={"Authorization": f"Token {stack.token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["checks"]
    except urllib.error.HTTPError as error:  # a 503 names what is down
        return json.loads(error.read())["checks"]
    except OSError:
        return {}


def settled(stack: Stack) -> bool:
    """Every component up, and a worker serving the default queue answers through the broker."""
    checks = health_checks(stack) if stack.all_up() else {}
    return bool(checks) and checks["broker"]["ok"] and checks["workers"]["ok"]


def wait_for(stack: Stack, pk: int, *wanted: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = api_call(stack, "GET", f"/api/storage/redis/instances/{pk}")
        if (status == 404 and "gone" in wanted) or body.get("status") in wanted:
            return body
        assert time.monotonic() < deadline, f"still {status} {body} after {timeout} s"
        time.sleep(0.2)


def test_the_runner_brings_back_what_dies_and_only_ctrl_c_stops_it(stack):
    """Issue 12: killing the broker under `make run` took web, worker and beat down with it."""
    assert os.stat(stack.data_dir).st_mode & 0o077 == 0, "make run tightens an existing DATA_DIR"
    assert os.stat(stack.data_dir / "old.log").st_mode & 0o077 == 0

    broker = stack.state()["components"]["broker"]
    cmdline = Path(f"/proc/{broker['pid']}/cmdline").read_bytes()
    assert stack.password.encode() not in cmdline + Path(f"/proc/{broker['pid']}/environ").read_bytes()
    # The broker has no TCP port a stranger could take while it is down and be sent the password:
    # only a Unix socket, in a folder of the portal's user that nobody else may enter.
    sock = stack.data_dir / "broker" / "redis.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
    assert connects_as(65534, sock) == "PermissionError"
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout
    assert f"pid={broker['pid']}," not in listening
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=str(sock), retry=NO_RETRY).ping()

    for name in ("broker", "worker", "web"):
        # Each kill once the stack has settled: every component up and the workers connected. A
        # worker that loses the broker while it holds a job may exit by itself (kombu's Redis
        # transport fails to hand the job back), and the runner starts it again too.
        stack.wait(lambda: settled(stack), 60, "every component up and the workers connected")
        before = stack.state()["components"][name]
        os.kill(before["pid"], signal.SIGKILL)

        def back(name=name, before=before) -> bool:
            component = stack.state()["components"][name]
            return component["up"] and component["pid"] != before["pid"]

        stack.wait(back, 60, f"{name} to come back")
        runner_log = (stack.logs / "runner.log").read_text()
        assert f"{name} (pid {before['pid']}) killed by SIGKILL" in runner_log
        assert f"{name} started again (pid" in runner_log
        assert stack.state()["components"][name]["restarts"] > before["restarts"]
    stack.wait(lambda: settled(stack), 60, "every component up and the workers connected")
    # /healthz names the restarts.
    runner = health_checks(stack)["runner"]
    assert runner["ok"] and "broker up, restarted 1x (last exit: killed by SIGKILL" in runner["detail"], runner

    # A create made afterwards runs, and works.
    status, body = api_call(stack, "POST", "/api/storage/redis/instances", {})
    assert status == 202, body
    pk = body["id"]
    created = wait_for(stack, pk, "running", "failed")
    assert created["status"] == "running", created["status_message"]
    _, config = api_call(stack, "GET", f"/api/storage/redis/instances/{pk}/config")
    tenant = redis.Redis.from_url(config["uri"], retry=NO_RETRY)
    tenant.set("after", "the kills")
    assert tenant.get("after") == b"the kills"
    tenant.close()

    # As nobody, nothing the portal wrote can be read: its DATA_DIR, nor the instance's folder.
    assert readable_as_nobody(stack.data_dir, skip=stack.data_dir / "static") == []
    instances = Path(stack.python("import django; django.setup(); from django.conf import settings; "
                                  "print(settings.STOCKROOM_INSTANCES_DIR)"))  # fmt: skip
    assert (instances / "redis" / str(pk)).is_dir()
    assert readable_as_nobody(instances / "redis" / str(pk)) == []
    assert api_call(stack, "DELETE", f"/api/storage/redis/instances/{pk}")[0] == 202
    wait_for(stack, pk, "gone")
    assert port_refuses(config["port"])

    # Ctrl-C stops everything, promptly, pool processes and gunicorn workers included.
    pids = stack.group_pids()
    assert len(pids) > 6
    assert stack.stop() < 20
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 10, "every process to exit")
    assert port_refuses(stack.web_port) and not (stack.data_dir / "broker" / "redis.sock").exists()


# Private files --------------------------------------------------------------------------------


# Run as nobody (setpriv): what it can list or read under a folder; names a stranger could guess
# are tried even where no folder can be listed.
_AS_NOBODY = """
import json, os, sys
from pathlib import Path
root, skip = Path(sys.argv[1]), sys.argv[2]
found = []
for parent, _folders, names in os.walk(root):
    if skip and Path(parent).is_relative_to(skip):
        continue
    found.append(f"listed {parent}")
    for name in names:
        try:
            with open(os.path.join(parent, name), "rb") as file:
                file.read(1)
            found.append(f"read {parent}/{name}")
        except OSError:
            pass
for name in ("portal.sqlite3", "portal.sqlite3-wal", "broker/redis.conf", "runner.json", "old.log"):
    try:
        with open(root / name, "rb") as file:
            file.read(1)
        found.append(f"read {name}")
    except OSError:
        pass
print(json.dumps(found))
"""


def readable_as_nobody(root: Path, *, skip: Path | None = None) -> list[str]:
    """What the user `nobody` can list or read under `root`."""
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(
        [
            "setpriv",
            f"--reuid={nobody.pw_uid}",
            f"--regid={nobody.pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _AS_NOBODY,
            str(root),
            str(skip or ""),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": processes.PATH},
    )
    return json.loads(result.stdout)


def test_nobody_can_read_what_is_readable():
    """The check itself: it sees what nobody may read."""
    assert "read /etc/hostname" in readable_as_nobody(Path("/etc"))


def test_nobody_reads_the_portals_files(api):
    """Issue 12, attack 2: as nobody, the DRF tokens were read from the portal's SQLite file."""
    pk, _ = running(api, "mysql")  # the database, an instance's files, a data template built
    database = Path(settings.DATABASES["default"]["NAME"])
    if database.exists():  # SQLite: the suite's own, made by this process
        assert os.stat(database).st_mode & 0o077 == 0
    assert readable_as_nobody(instance_dir("mysql", pk)) == []
    assert readable_as_nobody(settings.STOCKROOM_INSTANCES_DIR / "_templates") == []
    delete(api, "mysql", pk)


def test_make_run_writes_a_private_env_and_upgrades_an_old_one(tmp_path):
    """`.env` is 0600 with a broker password; one from before gets both."""
    shutil.copy(settings.BASE_DIR / "Makefile", tmp_path / "Makefile")
    subprocess.run(["make", "-s", "env-upgrade"], cwd=tmp_path, check=True, capture_output=True)
    fresh = (tmp_path / ".env").read_text()
    assert os.stat(tmp_path / ".env").st_mode & 0o777 == 0o600
    assert [line.split("=")[0] for line in fresh.splitlines()] == [
        "DEBUG", "SECRET_KEY", "STOCKROOM_ENCRYPTION_KEYS", "STOCKROOM_BROKER_PASSWORD"
    ]  # fmt: skip
    assert len(fresh.splitlines()[-1].split("=", 1)[1]) >= 32

    old = tmp_path / ".env"
    old.write_text("DEBUG=False\nSECRET_KEY=kept\nSTOCKROOM_ENCRYPTION_KEYS=kept-too\n")
    os.chmod(old, 0o644)
    subprocess.run(["make", "-s", "env-upgrade"], cwd=tmp_path, check=True, capture_output=True)
    upgraded = old.read_text().splitlines()
    assert upgraded[:3] == ["DEBUG=False", "SECRET_KEY=kept", "STOCKROOM_ENCRYPTION_KEYS=kept-too"]
    assert upgraded[3].startswith("STOCKROOM_BROKER_PASSWORD=") and len(upgraded) == 4
    assert os.stat(old).st_mode & 0o777 == 0o600
    subprocess.run(["make", "-s", "env-upgrade"], cwd=tmp_path, check=True, capture_output=True)
    assert old.read_text().splitlines() == upgraded, "a second run adds nothing"


def test_portal_processes_run_with_umask_077():
    for argv in (
        [sys.executable, "-c", "import os, portal; print(oct(os.umask(0)))"],
        [sys.executable, "manage.py", "shell", "-c", "import os; print(oct(os.umask(0)))"],
    ):
        result = subprocess.run(
            argv, cwd=settings.BASE_DIR, capture_output=True, text=True, env=os.environ | {"PYTHONPATH": "."}
        )
        assert result.stdout.strip().splitlines()[-1] == "0o77", result.stderr


def test_the_runner_does_not_start_next_to_a_stranger_on_its_port(tmp_path):
    """Whoever holds the web port would be sent every sign-in: the runner refuses to start."""
    stranger = socket.socket()
    stranger.bind(("127.0.0.1", 0))
    stranger.listen()
    port = stranger.getsockname()[1]
    stack = Stack(
        tmp_path / "stack",
        web_port=port,
        port_range=(settings.STOCKROOM_PORT_RANGE[1] - 9, settings.STOCKROOM_PORT_RANGE[1]),
    )
    try:
        stack.prepare()
        runner = subprocess.run(
            [sys.executable, "-m", "portal.runner", "--port", str(port)],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=settings.BASE_DIR,
        )
        assert runner.returncode != 0
        assert f"Port {port} on 127.0.0.1 is held by another process" in runner.stderr
        stranger.settimeout(0)
        with pytest.raises(BlockingIOError):
            stranger.accept()  # nobody was sent anything
    finally:
        stranger.close()
        stack.remove()


def test_a_new_runner_stops_what_a_killed_runner_left(stack):
    """kill -9 of the runner itself leaves its components running (each in a session of its own);
    the next `make run` stops them and takes their ports, instead of failing to bind forever."""
    left = stack.group_pids() - {stack.runner.pid}
    os.killpg(stack.runner.pid, signal.SIGKILL)
    stack.runner.wait()
    assert all(Path(f"/proc/{pid}").exists() for pid in left)

    stack.start()
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in left), 10, "the old components to go")
    assert all(component["restarts"] == 0 for component in stack.state()["components"].values())
    assert "that an earlier runner left running" in (stack.logs / "runner.log").read_text()
