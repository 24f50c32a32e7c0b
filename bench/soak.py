"""The soak (`make soak`, or `python -m bench.soak`): N clients create, use, act on and delete
instances for D minutes against a portal of its own, started like `make run` (devtools.stack),
optionally while servers, the broker and the worker are kill -9'd at random. Not part of `make test`.

Each client loops: create (MySQL or Redis, in turn) → wait until running → write and read real
data (PyMySQL, redis-py) → stop/start, restart or rotate the password (one or two at random, the
data checked after each) → delete → wait until gone. A lifecycle that ends anywhere else is an
error, and so is any 5xx. At the end it reports what is left behind: instances, server processes,
listening ports, folders, and any process of the stack after Ctrl-C.

    python -m bench.soak --clients 6 --minutes 4 --kills
"""

import argparse
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pymysql
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devtools.stack import Stack
from provisioning.backends.processes import processes

from .client import Api

ACTIONS = ("stop-start", "restart", "rotate-password")
SETTLED = ("running", "stopped", "failed")  # statuses no worker or healer moves on from by itself
# What a user retries once: the job was not queued (the broker was coming back), or a start's
# server was killed while it started (the killer got it).
RETRIED = ("could not be queued", "exited during start-up")
# Seconds an instance may take to reach a wanted status: a job lost with a killed worker is redone
# once its claim lapses and the reconciler finds it stuck (STOCKROOM_STUCK_TIMEOUT, 120 s).
SETTLE = 300.0


@dataclass
class Tally:
    lifecycles: int = 0
    completed: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list[str] = field(default_factory=list)
    server_errors: int = 0  # 5xx answers
    requests: int = 0
    actions: Counter = field(default_factory=Counter)
    retried: Counter = field(default_factory=Counter)  # actions a user would try again, and did
    kills: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def error(self, what: str, detail: str) -> None:
        with self.lock:
            self.errors[what] += 1
            if len(self.error_examples) < 20:
                self.error_examples.append(f"{what}: {detail[:300]}")


class LifecycleError(Exception):
    def __init__(self, what: str, detail: str):
        super().__init__(detail)
        self.what = what


class Client(threading.Thread):
    """One user of the portal, looping through lifecycles until the deadline."""

    def __init__(self, number: int, stack: Stack, tally: Tally, deadline: float):
        super().__init__(name=f"client-{number}", daemon=True)
        self.number, self.stack, self.tally, self.deadline = number, stack, tally, deadline
        self.api = Api(stack.token, port=stack.web_port)
        self.random = random.Random(number)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        for _attempt in range(30):  # gunicorn may be down for a moment while the runner restarts it
            try:
                status, data = self.api.request(method, path, body)
                break
            except OSError:
                self.api.close()
                time.sleep(1)
        else:
            raise LifecycleError("api unreachable", f"{method} {path}")
        with self.tally.lock:
            self.tally.requests += 1
            if status >= 500:
                self.tally.server_errors += 1
        if status >= 500:
            raise LifecycleError("5xx", f"{method} {path} -> {status} {data}")
        return status, data or {}

    def wait_for(self, kind: str, pk: int, *wanted: str) -> dict:
        deadline = time.monotonic() + SETTLE
        while True:
            status, body = self.call("GET", f"/api/storage/{kind}/instances/{pk}")
            if (status == 404 and "gone" in wanted) or body.get("status") in wanted:
                return body
            if body.get("status") in SETTLED:  # and not wanted: the job failed
                raise LifecycleError(f"{kind} ended {body['status']}", body.get("status_message", ""))
            if time.monotonic() > deadline:
                raise LifecycleError(f"{kind} stuck", f"{pk}: {body.get('status')} {body.get('status_message')}")
            time.sleep(0.2)

    def run(self) -> None:
        kinds = ("redis", "mysql") if self.number % 2 else ("mysql", "redis")
        turn = 0
        while time.monotonic() < self.deadline:
            kind = kinds[turn % 2]
            turn += 1
            with self.tally.lock:
                self.tally.lifecycles += 1
            try:
                self.lifecycle(kind)
                with self.tally.lock:
                    self.tally.completed += 1
            except LifecycleError as error:
                self.tally.error(error.what, str(error))
            except Exception as error:  # noqa: BLE001 - a soak reports every failure and goes on
                self.tally.error(type(error).__name__, repr(error))

    def lifecycle(self, kind: str) -> None:
        status, body = self.call("POST", f"/api/storage/{kind}/instances", {})
        if status != 202:
            raise LifecycleError("create refused", f"{status} {body}")
        pk = body["id"]
        try:
            self.wait_for(kind, pk, "running")
            value = f"client {self.number} instance {pk}"
            self.use(kind, pk, write=value)
            for action in self.random.sample(ACTIONS, self.random.randint(1, 2)):
                self.act(kind, pk, action)
                self.use(kind, pk, expect=value)
        finally:
            self.delete(kind, pk)

    def act(self, kind: str, pk: int, action: str) -> None:
        steps = ("stop", "start") if action == "stop-start" else (action,)
        for step in steps:
            for attempt in range(2):
                try:
                    self.step(kind, pk, step)
                    break
                except LifecycleError as error:
                    if attempt or not any(reason in str(error) for reason in RETRIED):
                        raise
                    with self.tally.lock:
                        self.tally.retried[f"{step}: {next(r for r in RETRIED if r in str(error))}"] += 1
        with self.tally.lock:
            self.tally.actions[action] += 1

    def step(self, kind: str, pk: int, step: str) -> None:
        self.wait_for(kind, pk, "running", "stopped")
        for _ in range(50):  # 409 while a healer restarts the instance after a kill
            status, body = self.call("POST", f"/api/storage/{kind}/instances/{pk}/{step}")
            if status != 409:
                break
            time.sleep(0.5)
        if status != 202:
            raise LifecycleError(f"{step} refused", f"{status} {body}")
        self.wait_for(kind, pk, "stopped" if step == "stop" else "running")

    def use(self, kind: str, pk: int, *, write: str | None = None, expect: str | None = None) -> None:
        """Write and read real data; after a kill the healer may need a moment: try for a while."""
        deadline = time.monotonic() + SETTLE
        while True:
            self.wait_for(kind, pk, "running")
            _, config = self.call("GET", f"/api/storage/{kind}/instances/{pk}/config")
            try:
                got = (use_mysql if kind == "mysql" else use_redis)(config, write)
            except (pymysql.Error, redis.RedisError, OSError) as error:
                if time.monotonic() > deadline:
                    raise LifecycleError(f"{kind} unusable", repr(error)) from None
                time.sleep(1)
                continue
            if expect is not None and got != expect:
                raise LifecycleError(f"{kind} lost data", f"{pk}: {got!r} != {expect!r}")
            return

    def delete(self, kind: str, pk: int) -> None:
        for attempt in range(2):
            for _ in range(100):  # a busy instance answers 409 until its action is done
                status, body = self.call("DELETE", f"/api/storage/{kind}/instances/{pk}")
                if status in (202, 404):
                    break
                time.sleep(0.5)
            else:
                raise LifecycleError("delete refused", f"{status} {body}")
            try:
                self.wait_for(kind, pk, "gone")
                return
            except LifecycleError as error:
                if attempt or "could not be queued" not in str(error):
                    raise
                with self.tally.lock:
                    self.tally.retried["delete: could not be queued"] += 1


def use_mysql(config: dict, write: str | None) -> str | None:
    connection = pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
        connect_timeout=5,
        read_timeout=10,
        autocommit=True,
    )
    try:
        with connection.cursor() as cursor:
            if write is not None:
                cursor.execute("CREATE TABLE IF NOT EXISTS soak (id INT PRIMARY KEY, value TEXT)")
                cursor.execute("REPLACE INTO soak VALUES (1, %s)", (write,))
            cursor.execute("SELECT value FROM soak WHERE id = 1")
            row = cursor.fetchone()
            return row[0] if row else None
    finally:
        connection.close()


def use_redis(config: dict, write: str | None) -> str | None:
    client = redis.Redis.from_url(config["uri"], socket_timeout=5, retry=Retry(NoBackoff(), 0))
    try:
        if write is not None:
            client.set("soak", write)
        value = client.get("soak")
        return value.decode() if value is not None else None
    finally:
        client.close()


class Killer(threading.Thread):
    """kill -9 a random server now and then, and now and then the broker or the worker."""

    def __init__(self, stack: Stack, instances: Path, tally: Tally, deadline: float, every: float):
        super().__init__(name="killer", daemon=True)
        self.stack, self.instances, self.tally, self.deadline, self.every = stack, instances, tally, deadline, every
        self.random = random.Random(12)

    def run(self) -> None:
        while time.monotonic() < self.deadline - 10:
            time.sleep(self.random.uniform(0.5, 1.5) * self.every)
            roll = self.random.random()
            if roll < 0.1:
                self.kill_component("broker")
            elif roll < 0.2:
                self.kill_component("worker")
            else:
                servers = [pid for pid in processes(under=self.instances) if _is_server(pid)]
                if servers:
                    os.kill(self.random.choice(servers), signal.SIGKILL)
                    with self.tally.lock:
                        self.tally.kills["server"] += 1

    def kill_component(self, name: str) -> None:
        component = self.stack.state().get("components", {}).get(name)
        if component and component["up"]:
            os.kill(component["pid"], signal.SIGKILL)
            with self.tally.lock:
                self.tally.kills[name] += 1


def _is_server(pid: int) -> bool:
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return False
    return name in ("mariadbd", "redis-server")


def listening(ports: range) -> list[int]:
    found = []
    for port in ports:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                found.append(port)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description="Soak the portal: lifecycles under load, optionally with kills.")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--minutes", type=float, default=4.0)
    parser.add_argument("--kills", action="store_true", help="kill -9 servers, the broker and the worker at random")
    parser.add_argument("--kill-every", type=float, default=8.0, help="seconds between kills, on average")
    parser.add_argument("--web-port", type=int, default=8720)
    parser.add_argument("--broker-port", type=int, help="a loopback port for the broker (default: a Unix socket)")
    parser.add_argument("--ports", default="32000,32599", help="the instances' port range")
    parser.add_argument("--concurrency", type=int, default=8, help="Celery worker processes")
    arguments = parser.parse_args()
    first, last = (int(port) for port in arguments.ports.split(","))

    root = Path(tempfile.mkdtemp(prefix="stockroom-soak-"))
    stack = Stack(
        root,
        web_port=arguments.web_port,
        broker_port=arguments.broker_port,
        port_range=(first, last),
        concurrency=arguments.concurrency,
        env={"STOCKROOM_QUOTA": "1000", "STOCKROOM_MEMORY_QUOTA": "1024gb", "LOG_LEVEL": "WARNING"},
    )
    tally = Tally()
    report: dict = {}
    try:
        stack.prepare()
        stack.start()
        instances = Path(
            stack.python(
                "import django; django.setup(); from django.conf import settings; "
                "print(settings.STOCKROOM_INSTANCES_DIR)"
            )  # fmt: skip
        )
        print(f"soak: {arguments.clients} clients for {arguments.minutes:g} min on {stack.url}", file=sys.stderr)
        started = time.monotonic()
        deadline = started + arguments.minutes * 60
        threads: list[threading.Thread] = [Client(n, stack, tally, deadline) for n in range(arguments.clients)]
        if arguments.kills:
            threads.append(Killer(stack, instances, tally, deadline, arguments.kill_every))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started

        # What is left behind, while the portal still runs: then after Ctrl-C.
        api = Api(stack.token, port=stack.web_port)
        _, mysql = api.request("GET", "/api/storage/mysql/instances")
        _, redis_list = api.request("GET", "/api/storage/redis/instances")
        left_instances = [i for body in (mysql, redis_list) for i in body["results"]]
        time.sleep(2)
        left_processes = processes(under=instances)
        left_folders = [str(p) for kind in ("mysql", "redis") for p in (instances / kind).glob("*")]
        left_ports = listening(range(first, last + 1))
        restarts = {name: c["restarts"] for name, c in stack.state()["components"].items()}
        exits = [line for line in (stack.logs / "runner.log").read_text().splitlines() if " after " in line]
        pids = stack.group_pids()
        stop_seconds = stack.stop()
        time.sleep(1)
        left_after_stop = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        report = {
            "clients": arguments.clients,
            "minutes": round(elapsed / 60, 2),
            "kills": dict(tally.kills),
            "lifecycles_started": tally.lifecycles,
            "lifecycles_completed": tally.completed,
            "actions": dict(tally.actions),
            "actions_retried_once": dict(tally.retried),
            "requests": tally.requests,
            "http_5xx": tally.server_errors,
            "errors": dict(tally.errors),
            "error_examples": tally.error_examples,
            "component_restarts": restarts,
            "component_exits": exits,
            "left_behind": {
                "instances": [f"{i['kind']}/{i['id']} {i['status']}" for i in left_instances],
                "server_processes": left_processes,
                "folders": left_folders,
                "listening_ports": left_ports,
                "processes_after_ctrl_c": left_after_stop,
            },
            "ctrl_c_seconds": round(stop_seconds, 1),
        }
    finally:
        stack.stop()
        stack.remove()
    print(json.dumps(report, indent=1))
    clean = not any(report["left_behind"].values()) if report else False
    sys.exit(0 if report and not report["errors"] and not report["http_5xx"] and clean else 1)


if __name__ == "__main__":
    main()
