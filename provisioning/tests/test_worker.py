"""The real thing: a Celery worker process and a Redis broker, as `make run` starts them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from django.conf import settings

from provisioning.engines.redis import NO_RETRY

from .conftest import broker_port, instance_dir, port_refuses, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def broker(tmp_path):
    port = broker_port()
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, retry=NO_RETRY)

    def answers() -> bool:
        try:
            return client.ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, 10, "the broker")
    yield
    server.terminate()
    server.wait(10)


class Worker:
    def __init__(self, log: Path):
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        database = settings.DATABASES["default"]["NAME"]  # the test database
        env = os.environ | {"DATABASE_URL": f"sqlite:///{database}"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "portal", "worker", "--concurrency", "2", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=self.log.open("a"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(lambda: " ready." in self.log.read_text(), 60, "the worker")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.log.write_text("")


@pytest.fixture
def worker(broker, queued_for_real, tmp_path):
    worker = Worker(tmp_path / "worker.log")
    worker.start()
    yield worker
    if worker.process.poll() is None:
        worker.stop()


def test_a_real_worker_provisions_and_deletes(api, worker):
    created = [(kind, api.post(f"/api/storage/{kind}/instances", {}).json()["id"]) for kind in ("mysql", "redis")]
    for kind, pk in created:
        instance = wait_for_status(api, kind, pk, "running", "failed")
        assert instance["status"] == "running", instance["status_message"]
    redis_config = api.get(f"/api/storage/redis/instances/{created[1][1]}/config").json()
    client = redis.Redis(host=redis_config["host"], port=redis_config["port"], password=redis_config["password"])
    client.set("survives", "the worker")

    # Servers are detached: a worker restart does not take them down.
    worker.stop()
    assert client.get("survives") == b"the worker"
    worker.start()

    for kind, pk in created:
        assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    for kind, pk in created:
        wait_for_status(api, kind, pk, "gone")
        assert not instance_dir(kind, pk).exists()
    assert port_refuses(redis_config["port"])
