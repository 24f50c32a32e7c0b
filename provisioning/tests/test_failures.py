"""Failures end in a readable `failed` status and leave nothing behind."""

import pytest

from provisioning.backends.base import BackendError
from provisioning.backends.local import LocalBackend, processes_under
from provisioning.models import Instance, WebhookDelivery

from .conftest import broker_port, instance_dir, port_refuses, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


class StartsThenFails(LocalBackend):
    """A real server is started and listens, then the login check fails: cleanup must kill it."""

    def _wait_for_login(self, instance, directory, log):
        assert processes_under(directory), "the server should be running at this point"
        wait_until(lambda: not port_refuses(instance.port), 30, "the server to listen")
        raise BackendError("injected failure after start")


def local_backend_with(settings, top=None, **programs):
    backend = dict(settings.STOCKROOM_BACKENDS["local"])
    backend.update(top or {})
    options = backend["OPTIONS"]
    backend["OPTIONS"] = {**options, "programs": {**options["programs"], **programs}}
    settings.STOCKROOM_BACKENDS = {"local": backend}


@pytest.mark.parametrize("kind", ["mysql", "redis"])
def test_a_failure_after_start_kills_the_server_and_releases_everything(api, settings, kind):
    local_backend_with(settings, top={"BACKEND": f"{__name__}.StartsThenFails"})
    before = set(processes_under(settings.STOCKROOM_INSTANCES_DIR))  # none, unless a failed test left one
    created = api.post(f"/api/storage/{kind}/instances", {}).json()
    pk, port = created["id"], created["port"]
    instance = wait_for_status(api, kind, pk, "failed", "running")
    assert instance["status"] == "failed"
    assert instance["status_message"] == "Provisioning failed: injected failure after start"
    assert instance["port"] is None, "a failed instance holds no port"
    assert port_refuses(port), "the server that was listening there is gone"
    assert not instance_dir(kind, pk).exists()
    assert set(processes_under(settings.STOCKROOM_INSTANCES_DIR)) <= before
    assert not Instance.objects.live().exists()


def test_a_server_that_will_not_start_ends_failed(api, settings):
    local_backend_with(settings, **{"redis-server": "/bin/false"})
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    instance = wait_for_status(api, "redis", pk, "failed", "running")
    # Started twice (a server that dies while starting gets one more try), then given up.
    assert instance["status_message"].startswith(
        "Provisioning failed, on its second try: The server exited during start-up."
    )
    assert not instance_dir("redis", pk).exists()
    events = list(Instance.objects.get(pk=pk).events.values_list("from_status", "to_status"))
    assert events == [("", "provisioning"), ("provisioning", "failed")]


def test_a_failed_instance_can_be_deleted(api, settings):
    local_backend_with(settings, **{"redis-server": "/bin/false"})
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "failed")
    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202
    wait_for_status(api, "redis", pk, "gone")


@pytest.mark.parametrize("webhook", [False, True], ids=["", "with-a-webhook"])
def test_an_unreachable_broker_fails_the_instance_with_a_message(api, queued_for_real, webhook):
    assert port_refuses(broker_port())
    if webhook:  # its deliveries cannot be queued either; they wait, and the create still answers
        api.post("/api/webhooks", {"url": "https://ci.example.com/hook"})
    response = api.post("/api/storage/redis/instances", {})
    assert response.status_code == 202
    instance = Instance.objects.get(pk=response.json()["id"])
    assert instance.status == "failed"
    assert "task broker is unreachable" in instance.status_message
    assert not instance_dir("redis", instance.pk).exists()
    if webhook:
        assert set(WebhookDelivery.objects.values_list("status", flat=True)) == {"pending"}


def test_a_failed_instance_whose_port_was_reused_can_still_be_deleted(api, settings):
    local_backend_with(settings, **{"redis-server": "/bin/false"})
    failed = api.post("/api/storage/redis/instances", {}).json()
    wait_for_status(api, "redis", failed["id"], "failed")
    local_backend_with(settings, **{"redis-server": "/usr/bin/redis-server"})
    reused = api.post("/api/storage/redis/instances", {}).json()
    assert reused["port"] == failed["port"]
    assert wait_for_status(api, "redis", reused["id"], "running")
    assert api.delete(f"/api/storage/redis/instances/{failed['id']}").status_code == 202
    wait_for_status(api, "redis", failed["id"], "gone")
    assert wait_for_status(api, "redis", reused["id"], "running")
    api.delete(f"/api/storage/redis/instances/{reused['id']}")
    wait_for_status(api, "redis", reused["id"], "gone")
