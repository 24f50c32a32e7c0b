"""Throwaway and idle instances against real servers: reconcile passes called directly (tasks run
inline), as beat would run them every period."""

import time
from datetime import timedelta

import pymysql
import pytest
import redis
from django.utils import timezone

from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance, Status
from provisioning.reconciler import Reconciler
from provisioning.services import DELETABLE, set_protected

from .conftest import instance_dir, port_refuses, wait_for_status, wait_until
from .test_docker_backend import docker_settings  # noqa: F401 - a fixture

pytestmark = pytest.mark.django_db(transaction=True)

PERIOD = 2.0  # seconds between reconcile passes here


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api):
    yield
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        Instance.objects.filter(pk=instance.pk).update(protected=False)
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def running(api, kind: str, **body) -> dict:
    response = api.post(f"/api/storage/{kind}/instances", body, format="json")
    assert response.status_code == 202, response.content
    instance = wait_for_status(api, kind, response.json()["id"], "running", "failed")
    assert instance["status"] == "running", instance
    return instance


def config(api, instance: dict) -> dict:
    return api.get(f"/api/storage/{instance['kind']}/instances/{instance['id']}/config").json()


def reconcile(*, later: float = 0):
    reconciler = Reconciler()
    if later:
        reconciler.clock = lambda: timezone.now() + timedelta(seconds=later)
    return reconciler.run_once()


# Expiry ------------------------------------------------------------------------------------


def test_an_instance_that_expires_in_seconds_is_gone_within_two_periods_and_was_warned(api, receiver):
    api.post("/api/webhooks", {"url": receiver.url})
    instance = running(api, "redis", expires_in="4s")
    pk, port = instance["id"], instance["port"]
    client = redis.Redis(port=port, password=config(api, instance)["password"], retry=NO_RETRY)
    client.set("order:1", "teapot")
    expires_at = Instance.objects.get(pk=pk).expires_at

    passes = 0
    while Instance.objects.get(pk=pk).status != Status.DELETED:
        assert timezone.now() < expires_at + timedelta(seconds=2 * PERIOD), "still there two periods after expiry"
        reconcile()
        passes += 1
        time.sleep(PERIOD)

    assert port_refuses(port)
    assert not instance_dir("redis", pk).exists()
    row = Instance.objects.get(pk=pk)
    assert row.events.get(to_status=Status.DELETING).reason == f"Expired at {expires_at:%Y-%m-%d %H:%M:%S} UTC."
    undo = row.snapshots.get(trigger="before-delete")
    assert undo.status == "ready", "the before-delete snapshot is kept"

    received = [(event["type"], event["to"]) for event in receiver.events()]
    assert ("instance.expiring", "running") in received
    assert received.index(("instance.expiring", "running")) < received.index(("instance.status_changed", "deleting"))
    expiring = next(event for event in receiver.events() if event["type"] == "instance.expiring")
    assert expiring["reason"].startswith(f"Expires at {expires_at:%Y-%m-%d %H:%M:%S} UTC")
    assert [event["type"] for event in receiver.events()].count("instance.expiring") == 1, "once"

    clone = api.post("/api/storage/redis/instances", {"from_snapshot": undo.pk}, format="json").json()
    copy = wait_for_status(api, "redis", clone["id"], "running", "failed")
    assert redis.Redis(port=copy["port"], password=config(api, copy)["password"]).get("order:1") == b"teapot"


def test_a_protected_instance_survives_expiry_and_refuses_delete(api, outsider):
    instance = running(api, "redis", expires_in="2s", protected=True)
    pk = instance["id"]
    time.sleep(2.5)
    report = reconcile()
    assert report.expired == []
    client = redis.Redis(port=instance["port"], password=config(api, instance)["password"], retry=NO_RETRY)
    assert client.ping(), "its server still serves"

    url = f"/api/storage/redis/instances/{pk}"
    response = api.delete(url)
    assert response.status_code == 409
    assert "clear `protected` first" in response.json()["detail"]
    assert outsider.post(f"{url}/extend", {"expires_in": "7d"}, format="json").status_code == 404
    assert outsider.delete(url).status_code == 404

    set_protected(instance=Instance.objects.get(pk=pk), protected=False, by="alice")
    assert reconcile().expired == [pk], "once cleared, it expires"
    wait_for_status(api, "redis", pk, "gone")


# Stop when idle ----------------------------------------------------------------------------


def open_client(kind: str, connection: dict):
    """A client of the tenant's, holding its connection open (and idle)."""
    if kind == "redis":
        client = redis.Redis(port=connection["port"], password=connection["password"], retry=NO_RETRY)
        client.ping()  # redis-py connects on the first command
        return client
    return pymysql.connect(
        host="127.0.0.1",
        port=connection["port"],
        user=connection["username"],
        password=connection["password"],
        database=connection["database"],
    )


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_an_idle_instance_is_stopped_and_one_with_a_client_is_not(api, kind):
    idle = running(api, kind, stop_when_idle="1m")
    busy = running(api, kind, stop_when_idle="1m")
    client = open_client(kind, config(api, busy))
    try:
        time.sleep(0.5)  # the workers' own logins at the start are long closed
        reconcile()
        rows = {row.pk: row for row in Instance.objects.filter(pk__in=[idle["id"], busy["id"]])}
        assert rows[idle["id"]].idle_since is not None
        assert rows[busy["id"]].idle_since is None, "a connected client is counted"

        time.sleep(0.5)
        report = reconcile(later=61)  # a minute on
        assert report.idle_stopped == [idle["id"]]
        assert wait_for_status(api, kind, idle["id"], "stopped", "unhealthy")["status"] == "stopped"
        assert port_refuses(idle["port"]), "the server is stopped, its memory freed"
        stop = Instance.objects.get(pk=idle["id"]).events.get(to_status=Status.STOPPING)
        assert stop.reason.startswith("No client connected for 60 s (stop_when_idle)")

        assert Instance.objects.get(pk=busy["id"]).status == Status.RUNNING
        if kind == "redis":
            assert client.ping(), "its client still works"
        else:
            client.ping(reconnect=False)
    finally:
        client.close()

    # It starts again as usual, with its data, and its idleness counts afresh.
    assert api.post(f"/api/storage/{kind}/instances/{idle['id']}/start").status_code == 202
    assert wait_for_status(api, kind, idle["id"], "running", "failed")["status"] == "running"
    assert Instance.objects.get(pk=idle["id"]).idle_since is None
    time.sleep(0.5)
    reconcile()
    assert Instance.objects.get(pk=busy["id"]).idle_since is not None, "its client left"


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_the_docker_backend_counts_the_tenants_connections_and_stops_an_idle_container(
    api,
    kind,
    docker_settings,  # noqa: F811 - the fixture imported above
):
    backend = docker_settings()
    instance = running(api, kind, stop_when_idle="1m")
    row = Instance.objects.get(pk=instance["id"])
    assert row.backend == "docker"
    time.sleep(0.5)
    assert backend.client_connections(row) == 0, "the portal's own session does not count"
    clients = [open_client(kind, config(api, instance)) for _ in range(2)]
    try:
        assert backend.client_connections(row) == 2
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: backend.client_connections(row) == 0, 5, "the clients to be gone")

    reconcile()
    assert reconcile(later=61).idle_stopped == [row.pk]
    assert wait_for_status(api, kind, row.pk, "stopped", "unhealthy")["status"] == "stopped"
    assert port_refuses(instance["port"])
