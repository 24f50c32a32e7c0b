"""A view-only operator forges the admin's delete action against a real Redis instance: the server
keeps answering with its data. The other access attacks need no server: fast/test_access_guard.py."""

import pytest
import redis
from django.contrib.auth.models import Permission
from django.test import Client

from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance, Status

from .conftest import wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_view_only_operator_cannot_delete_a_running_server(api, django_user_model):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert wait_for_status(api, "redis", pk, "running", "failed")["status"] == "running"
    config = api.get(f"/api/storage/redis/instances/{pk}/config")
    assert "no-store" in config["Cache-Control"]
    config = config.json()
    server = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    server.set("kept", "yes")

    vera = django_user_model.objects.create_user("vera", password="staff-password-1", is_staff=True)
    vera.user_permissions.set(Permission.objects.filter(codename="view_instance"))
    viewer = Client()
    viewer.force_login(vera)
    assert 'value="delete_instances"' not in viewer.get("/admin/provisioning/instance/").content.decode()
    forged = {"action": "delete_instances", "_selected_action": [pk], "index": "0"}
    assert viewer.post("/admin/provisioning/instance/", forged).status_code in (200, 302)

    assert Instance.objects.get(pk=pk).status == Status.RUNNING
    assert wait_for_status(api, "redis", pk, "running")["status"] == "running"
    assert server.get("kept") == b"yes", "the server still answers, with its data"
    server.close()

    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")
