"""Changes after create, in logic: what PATCH, the settings page and the admin decide, over the fake
backend. That the changes reach a real server is shown in test_changes.py (real servers)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from provisioning import services
from provisioning.backends.base import BackendError
from provisioning.models import Instance, InstanceEvent

MiB = 1024 * 1024


def patch(api, pk: int, body: dict, kind: str = "redis", query: str = ""):
    return api.patch(f"/api/storage/{kind}/instances/{pk}{query}", body, format="json")


def test_live_options_reach_the_server_and_restart_ones_wait(api, create, fake):
    instance = create("redis")
    response = patch(api, instance["id"], {"maxmemory": "128mb", "databases": 32})
    assert response.status_code == 202
    body = response.json()
    assert body["options"]["maxmemory"] == 128 * MiB and body["options"]["databases"] == 16
    assert body["pending_options"] == {"databases": 32}
    server = fake.server(instance["id"])
    assert server.options["maxmemory"] == 128 * MiB and server.memory_limit == body["memory_limit"]
    assert body["memory_reservation"] == 128 * MiB + 16 * MiB


def test_where_a_limit_cannot_change_live_what_changes_it_waits_for_the_restart(api, create, act, fake, monkeypatch):
    """On the swarm a running server's memory limit stays until its restart: an option that would
    grow the server past it (maxmemory) waits too, while one that does not (timeout) applies now."""
    monkeypatch.setattr(type(fake), "changes_memory_live", False)
    instance = create("redis")

    body = patch(api, instance["id"], {"maxmemory": "128mb"}).json()
    assert body["pending_options"] == {"maxmemory": 128 * MiB}
    assert fake.server(instance["id"]).options["maxmemory"] == 64 * MiB, "the server is not grown past its limit"
    assert body["memory_limit"] == instance["memory_limit"]
    body = patch(api, instance["id"], {"timeout": 300}).json()
    assert body["options"]["timeout"] == 300 and fake.server(instance["id"]).options["timeout"] == 300

    after = act(instance, "restart")
    assert after["pending_options"] == {} and after["options"]["maxmemory"] == 128 * MiB
    assert after["memory_limit"] > instance["memory_limit"]


def test_a_restart_takes_the_pending_options(api, create, act, fake):
    instance = create("redis")
    patch(api, instance["id"], {"databases": 32})
    after = act(instance, "restart")
    assert after["pending_options"] == {} and after["options"]["databases"] == 32
    assert fake.server(instance["id"]).options["databases"] == 32


def test_apply_now_restarts(api, create, committed):
    instance = create("redis")
    with committed():
        response = patch(api, instance["id"], {"databases": 4}, query="?apply=now")
    assert response.json()["status"] == "restarting"


def test_a_refused_live_change_is_409_and_changes_nothing(api, create, fake):
    instance = create("redis")
    fake.fail_next("reconfigure", BackendError("maxmemory reads back as '0'"))
    response = patch(api, instance["id"], {"maxmemory": "128mb"})
    assert response.status_code == 409
    assert "Nothing was changed" in response.json()["detail"]
    row = Instance.objects.get(pk=instance["id"])
    assert row.options["maxmemory"] == 64 * MiB and row.memory_reservation == 80 * MiB


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"charset": "latin1"}, "charset"),
        ({"lower_case_table_names": 1}, "lower_case_table_names"),
        ({"disk": "2gb"}, "disk"),
        ({"sql_mode": "NOT_A_MODE"}, "sql_mode"),
        ({"time_zone": "Nowhere/Town"}, "time_zone"),
        ({"innodb_buffer_pool_size": "1gb", "options": {"innodb_buffer_pool_size": "2gb"}}, "innodb_buffer_pool_size"),
        ({"status": "running"}, "status"),
        ({"name": "Not A Name"}, "name"),
    ],
)
def test_bad_patches_are_400_naming_the_field(api, create, body, field):
    instance = create("mysql")
    response = patch(api, instance["id"], body, kind="mysql")
    assert response.status_code == 400
    assert field in response.json()
    assert not InstanceEvent.objects.filter(instance_id=instance["id"], type="instance.options_changed").exists()


def test_another_users_instance_is_404(api, create, outsider):
    instance = create("redis")
    assert patch(outsider, instance["id"], {"timeout": 5}).status_code == 404


def test_a_failed_instance_keeps_its_options(api, create):
    instance = create("redis")
    Instance.objects.filter(pk=instance["id"]).update(status="failed", port=None)
    assert patch(api, instance["id"], {"timeout": 5}).status_code == 409
    assert patch(api, instance["id"], {"name": "still-named"}).status_code == 202


def test_the_settings_page_marks_each_mode_and_applies_through_the_service(client, alice, create, fake):
    instance = create("redis")
    client.force_login(alice)
    page = client.get(f"/instances/{instance['id']}/settings/").content.decode()
    assert 'data-apply="live"' in page and 'data-apply="restart"' in page and "disabled" in page
    form = {
        "name": instance["name"], "maxmemory": "96mb", "maxmemory_policy": "noeviction", "maxclients": "1000",
        "appendfsync": "everysec", "timeout": "0", "notify_keyspace_events": "", "maxmemory_samples": "5",
        "databases": "8", "backup_interval_hours": "24", "backup_retention": "7",
    }  # fmt: skip
    response = client.post(f"/instances/{instance['id']}/settings/", form)
    assert response.status_code == 302
    assert fake.server(instance["id"]).options["maxmemory"] == 96 * MiB
    panel = client.get(f"/instances/{instance['id']}/panel/").content.decode()
    assert "databases 16 → 8" in panel and 'data-action="restart-now"' in panel


def test_the_admin_changes_options_through_the_service(admin_client, create, fake):
    instance = create("redis")
    page = admin_client.get(f"/admin/provisioning/instance/{instance['id']}/change/").content.decode()
    assert f"/admin/provisioning/instance/{instance['id']}/settings/" in page
    form = {
        "name": instance["name"], "maxmemory": "80mb", "maxmemory_policy": "allkeys-lru", "maxclients": "1000",
        "appendfsync": "everysec", "timeout": "0", "notify_keyspace_events": "", "maxmemory_samples": "5",
        "databases": "16", "backup_interval_hours": "24", "backup_retention": "7",
    }  # fmt: skip
    response = admin_client.post(f"/admin/provisioning/instance/{instance['id']}/settings/", form)
    assert response.status_code == 302
    assert fake.server(instance["id"]).options["maxmemory_policy"] == "allkeys-lru"
    event = InstanceEvent.objects.filter(instance_id=instance["id"], type="instance.options_changed").get()
    assert "by admin" in event.reason and "maxmemory 64mb → 80mb" in event.reason


def test_more_memory_than_the_host_has_left_is_503_and_changes_nothing(api, create, fake, settings):
    instance = create("redis")
    settings.STOCKROOM_MEMORY_BUDGET = 100 * MiB
    response = patch(api, instance["id"], {"maxmemory": "512mb"})
    assert response.status_code == 503
    assert fake.server(instance["id"]).options["maxmemory"] == 64 * MiB
    assert Instance.objects.get(pk=instance["id"]).memory_reservation == 80 * MiB


def test_a_stopped_instance_reserves_nothing_until_it_starts(api, create, act, settings):
    instance = act(create("redis"), "stop")
    settings.STOCKROOM_MEMORY_QUOTA = 100 * MiB
    response = patch(api, instance["id"], {"maxmemory": "512mb"})
    assert response.status_code == 202 and response.json()["pending_options"] == {}
    assert api.post(f"/api/storage/redis/instances/{instance['id']}/start").status_code == 403


def test_a_growth_that_waits_for_the_restart_is_checked_against_the_quota_now(api, create, settings, fake, monkeypatch):
    """Where the growth of a running server waits for its restart (the swarm's), it is checked against
    the quota when it is asked for, not found too big only when the restart brings it."""
    monkeypatch.setattr(type(fake), "changes_memory_live", False)
    instance = create("redis")
    settings.STOCKROOM_MEMORY_QUOTA = 100 * MiB
    response = patch(api, instance["id"], {"maxmemory": "512mb"})
    assert response.status_code == 403, response.content
    assert Instance.objects.get(pk=instance["id"]).pending_options == {}

    settings.STOCKROOM_MEMORY_QUOTA = 1024 * MiB
    body = patch(api, instance["id"], {"maxmemory": "512mb"}).json()
    assert body["pending_options"] == {"maxmemory": 512 * MiB}


def test_a_server_that_cannot_be_reached_is_409_not_500(api, create, fake):
    instance = create("redis")
    fake.fail_next("reconfigure", FileNotFoundError(2, "No such file or directory"))
    response = patch(api, instance["id"], {"timeout": 5})
    assert response.status_code == 409
    assert "could not be reached" in response.json()["detail"]


def test_an_empty_patch_changes_nothing_and_says_nothing(api, create):
    instance = create("redis")
    before = Instance.objects.get(pk=instance["id"])
    assert patch(api, instance["id"], {}).status_code == 202
    assert patch(api, instance["id"], {"timeout": 0, "name": instance["name"]}).status_code == 202
    after = Instance.objects.get(pk=instance["id"])
    assert after.updated_at == before.updated_at, "healing reads updated_at as the last status change"
    assert not InstanceEvent.objects.filter(instance_id=instance["id"], type="instance.options_changed").exists()


def test_a_patch_while_a_worker_holds_the_instance_is_409(api, create):
    instance = create("redis")
    Instance.objects.filter(pk=instance["id"]).update(claimed_until=timezone.now() + timedelta(minutes=1))
    response = patch(api, instance["id"], {"timeout": 5})
    assert response.status_code == 409 and "holds it" in response.json()["detail"]


def test_a_start_counts_the_reservation_as_the_row_holds_it_now(api, create, act, settings):
    instance = act(create("redis"), "stop")
    stale = Instance.objects.get(pk=instance["id"])  # read before the resize below
    assert patch(api, instance["id"], {"maxmemory": "512mb"}).status_code == 202
    settings.STOCKROOM_MEMORY_QUOTA = 200 * MiB
    with pytest.raises(services.QuotaExceeded):
        services.request_action(instance=stale, action="start", by="test")
