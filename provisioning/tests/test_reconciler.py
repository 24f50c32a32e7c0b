"""Fault injection against real servers, a real worker and celery beat running the reconciler."""

import os
import signal
import socket
from datetime import datetime
from functools import partial

import pymysql
import pytest
import redis
from django.conf import settings
from django.utils import timezone

from provisioning.backends.local import processes_under
from provisioning.models import Instance

from .conftest import Worker, instance_dir, port_refuses, verify, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

PERIOD = 2  # seconds between reconcile passes in these tests

# Fast clocks for a dead worker's leftovers: stuck after 2 s, a claim lasts 4 s.
RECOVERY = {"STOCKROOM_STUCK_TIMEOUT": "2", "STOCKROOM_CLAIM_SECONDS": "4"}


@pytest.fixture
def reconciling_worker(broker, queued_for_real, tmp_path):
    worker = Worker(
        tmp_path / "worker.log", beat=True, concurrency=4, env={"STOCKROOM_RECONCILE_INTERVAL": str(PERIOD)}
    )
    worker.start()
    yield worker
    if worker.process.poll() is None:
        worker.stop()


def events(api, kind: str, pk: int) -> list[dict]:
    return api.get(f"/api/storage/{kind}/instances/{pk}/events?page_size=100").json()["results"]


def when(event: dict) -> datetime:
    return datetime.fromisoformat(event["time"])


def came_back(api, kind: str, pk: int) -> bool:
    history = events(api, kind, pk)
    return len(history) >= 4 and history[-1]["to"] == "running"


def kill_server(kind: str, pk: int) -> None:
    pids = processes_under(instance_dir(kind, pk))
    assert pids, "the server should be running"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_a_killed_server_is_restarted_with_its_data(api, reconciling_worker, receiver):
    hook = api.post("/api/webhooks", {"url": receiver.url}).json()
    mysql_pk = api.post("/api/storage/mysql/instances", {}).json()["id"]
    redis_pk = api.post("/api/storage/redis/instances", {"appendfsync": "always"}).json()["id"]
    for kind, pk in (("mysql", mysql_pk), ("redis", redis_pk)):
        assert wait_for_status(api, kind, pk, "running", "failed")["status"] == "running"
    mysql_config = api.get(f"/api/storage/mysql/instances/{mysql_pk}/config").json()
    redis_config = api.get(f"/api/storage/redis/instances/{redis_pk}/config").json()
    with mysql_connect(mysql_config) as db, db.cursor() as cursor:
        cursor.execute("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(20)) ENGINE=InnoDB")
        cursor.execute("INSERT INTO orders VALUES (1, 'teapot')")
        db.commit()
    redis.Redis(port=redis_config["port"], password=redis_config["password"]).set("order:1", "teapot")

    killed_at = timezone.now()
    kill_server("mysql", mysql_pk)
    kill_server("redis", redis_pk)

    for kind, pk in (("mysql", mysql_pk), ("redis", redis_pk)):
        wait_until(partial(came_back, api, kind, pk), 2 * PERIOD + 30, f"{kind} to come back")
        down, up = events(api, kind, pk)[-2:]
        assert (down["from"], down["to"]) == ("running", "unhealthy")
        assert down["reason"].startswith("Stopped answering")
        assert (up["from"], up["to"]) == ("unhealthy", "running")
        assert up["reason"] == "Restarted after it stopped answering (attempt 1)."
        # Noticed and repaired within two reconcile periods of the kill.
        assert (when(up) - killed_at).total_seconds() <= 2 * PERIOD

    with mysql_connect(mysql_config) as db, db.cursor() as cursor:
        cursor.execute("SELECT item FROM orders WHERE id = 1")
        assert cursor.fetchone() == ("teapot",)
    assert redis.Redis(port=redis_config["port"], password=redis_config["password"]).get("order:1") == b"teapot"

    def told() -> set[tuple[int, str, str]]:
        return {(event["instance"]["id"], event["from"], event["to"]) for event in receiver.events()}

    # Deliveries go out after the change commits, from another worker process: give them a moment.
    expected = {
        (pk, frm, to) for pk in (mysql_pk, redis_pk) for frm, to in (("running", "unhealthy"), ("unhealthy", "running"))
    }
    wait_until(lambda: expected <= told(), 30, f"webhook events {expected - told()}")
    assert all(verify(hook["secret"], headers, body) for headers, body in receiver.received)

    for kind, pk in (("mysql", mysql_pk), ("redis", redis_pk)):
        api.delete(f"/api/storage/{kind}/instances/{pk}")
        wait_for_status(api, kind, pk, "gone")


def test_healthz_reports_each_part(admin_client, reconciling_worker):
    wait_until(lambda: admin_client.get("/healthz").status_code == 200, 3 * PERIOD, "a healthy portal")
    checks = admin_client.get("/healthz").json()["checks"]
    assert set(checks) == {"database", "broker", "workers", "reconciler", "backends", "runner", "pool"}
    assert checks["workers"]["detail"] == "Workers answered for the celery and webhooks queues."
    assert checks["pool"] == {"ok": True, "detail": "Off: every kind's pool size (STOCKROOM_POOL_<KIND>) is 0.",
                              "ms": checks["pool"]["ms"]}  # fmt: skip

    reconciling_worker.stop()
    response = admin_client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "down"
    assert body["checks"]["workers"] == {"ok": False, "detail": "No worker answered a ping within 1 s.",
                                         "ms": body["checks"]["workers"]["ms"]}  # fmt: skip
    assert body["checks"]["database"]["ok"] and body["checks"]["broker"]["ok"]


def test_healthz_without_a_broker(admin_client):
    body = admin_client.get("/healthz").json()
    assert body["status"] == "down"
    assert not body["checks"]["broker"]["ok"]
    assert body["checks"]["workers"]["detail"] == "Not checked: workers are reached through the broker."
    assert body["checks"]["reconciler"]["detail"] == "No reconcile pass has finished yet; is celery beat running?"


def test_healthz_answers_when_the_broker_hangs(admin_client, monkeypatch):
    """A broker that accepts connections but never answers must not hold the answer."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("CELERY_BROKER_URL", f"redis://127.0.0.1:{silent.getsockname()[1]}/0")  # Celery reads it
        body = admin_client.get("/healthz").json()
    assert body["status"] == "down"
    assert body["checks"]["broker"] == {"ok": False, "detail": "Timeout reading from socket",
                                        "ms": body["checks"]["broker"]["ms"]}  # fmt: skip
    assert body["checks"]["database"]["ok"] is True


@pytest.fixture
def slow_redis_server():
    """A redis-server that takes 2 s to start, or (for instances named doomed-*) dies instead.

    It lives under the instances folder, where the unprivileged server user can run it.
    """
    path = settings.STOCKROOM_INSTANCES_DIR / "_test-bin" / "slow-redis-server"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\nsleep 2\ngrep -q "(doomed-" "$1" && exit 1\nexec /usr/bin/redis-server "$@"\n')
    path.chmod(0o755)
    path.parent.chmod(0o755)
    yield str(path)
    path.unlink()


def test_a_worker_killed_mid_create_leaves_nothing_behind(api, broker, queued_for_real, tmp_path, slow_redis_server):
    worker = Worker(tmp_path / "worker.log", env={"STOCKROOM_REDIS_SERVER": slow_redis_server, **RECOVERY})
    worker.start()
    survivor = api.post("/api/storage/redis/instances", {"name": "survivor"}).json()["id"]
    doomed = api.post("/api/storage/redis/instances", {"name": "doomed-one"}).json()["id"]
    doomed_port = Instance.objects.get(pk=doomed).port
    starting = [instance_dir("redis", pk) for pk in (survivor, doomed)]
    wait_until(lambda: all(map(processes_under, starting)), 30, "both servers to be starting")
    worker.kill()
    assert Instance.objects.get(pk=survivor).status == "provisioning"

    # A new worker, with beat: the reconciler finds both stuck once the dead worker's claims expire.
    # The survivor's server answers, so it is running; the doomed one is created again, and fails.
    env = {"STOCKROOM_REDIS_SERVER": slow_redis_server, "STOCKROOM_RECONCILE_INTERVAL": "1", **RECOVERY}
    worker = Worker(tmp_path / "worker2.log", beat=True, env=env)
    worker.start()
    try:
        running = wait_for_status(api, "redis", survivor, "running", "failed", timeout=60)
        assert running["status_message"] == "The worker handling it stopped; the server answers, so it is running."
        config = api.get(f"/api/storage/redis/instances/{survivor}/config").json()
        assert redis.Redis(port=config["port"], password=config["password"]).ping()

        failed = wait_for_status(api, "redis", doomed, "failed", "running", timeout=60)
        assert failed["status"] == "failed"
        assert failed["status_message"].startswith(
            "Provisioning failed, on its second try: The server exited during start-up."
        )
        events = [
            event["reason"] for event in api.get(f"/api/storage/redis/instances/{doomed}/events").json()["results"]
        ]
        assert events == ["Requested by alice.", failed["status_message"]]
        assert failed["port"] is None
        assert not instance_dir("redis", doomed).exists()
        assert port_refuses(doomed_port)

        api.delete(f"/api/storage/redis/instances/{survivor}")
        api.delete(f"/api/storage/redis/instances/{doomed}")
        wait_for_status(api, "redis", survivor, "gone")
        wait_for_status(api, "redis", doomed, "gone")
        assert not instance_dir("redis", survivor).exists()
        assert port_refuses(config["port"])
    finally:
        worker.stop()


def mysql_connect(config: dict):
    return pymysql.connect(
        host=config["host"], port=config["port"], user=config["username"], password=config["password"],
        database=config["database"],
    )  # fmt: skip
