"""Capacity: the host's memory budget (503), each user's memory and count quotas (403), counted
in the reservations of instances that run or may run, and in instances that hold data.

A default Redis (maxmemory 64mb) reserves 80 MiB; a MySQL reserves 64 MiB.
"""

import threading
import time

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from portal import settings as portal_settings
from provisioning import services
from provisioning.backends.base import BackendError
from provisioning.backends.fake import FakeBackend
from provisioning.models import Instance, Status

from .conftest import reconcile

pytestmark = pytest.mark.django_db

MiB = 1024**2
REDIS = 80 * MiB  # what a default Redis reserves


def post(client, kind: str = "redis", **body):
    return client.post(f"/api/storage/{kind}/instances", body, format="json")


# Each instance shows what it reserves -------------------------------------------------


def test_an_instance_shows_its_reservation_limit_and_disk(create):
    redis = create("redis", maxmemory="256mb", disk="2gb")
    assert redis["memory_reservation"] == 256 * MiB + 16 * MiB
    assert redis["memory_limit"] == 256 * MiB + 128 * MiB + 64 * MiB
    assert redis["options"]["disk"] == 2 * 1024**3
    mysql = create("mysql")
    assert (mysql["memory_reservation"], mysql["memory_limit"]) == (64 * MiB, 512 * MiB)
    assert mysql["options"]["disk"] == 1024**3


def test_each_user_sees_what_they_hold_against_their_quotas_in_the_api_and_on_pages(
    api, outsider, create, act, client, alice, settings
):
    settings.STOCKROOM_QUOTA, settings.STOCKROOM_MEMORY_QUOTA = 5, 1024 * MiB
    create("redis", maxmemory="256mb", disk="2gb")
    stopped = create("mysql")
    act(stopped, "stop")
    post(outsider)  # another user's counts for them only
    assert api.get("/api/usage").json() == {
        "instances": 2,
        "instance_quota": 5,
        "memory_reserved": 272 * MiB,  # the stopped one reserves nothing
        "memory_quota": 1024 * MiB,
        "snapshot_storage": 0,
        "snapshot_quota": settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES,
    }

    client.force_login(alice)
    dashboard = " ".join(client.get("/").content.decode().split())
    assert "You hold 2 of 5 instances; they reserve 272 MiB of your 1.0 GiB memory quota." in dashboard
    assert "Your snapshots and archived logs take 0 bytes of your" in dashboard
    redis = Instance.objects.get(kind="redis", owner=alice)
    panel = " ".join(client.get(f"/instances/{redis.pk}/").content.decode().split())
    assert "reserves 272 MiB, at most 448 MiB" in panel and "at most 2.0 GiB" in panel


# The host's budget ----------------------------------------------------------------------


def test_a_create_beyond_the_budget_answers_503_naming_the_numbers(api, outsider, settings, fake):
    settings.STOCKROOM_MEMORY_BUDGET = 230 * MiB
    assert post(api).status_code == 202
    assert post(outsider).status_code == 202, "the budget is the host's: everyone's instances count"

    response = post(api)
    assert response.status_code == 503
    assert response.json()["detail"] == (
        "The host has no room for a new Redis instance: it needs 80 MiB of memory, and instances reserve "
        "160 MiB of the host's 230 MiB budget. Free memory by stopping or deleting instances, or ask an "
        "operator to raise STOCKROOM_MEMORY_BUDGET."
    )
    assert Instance.objects.count() == 2, "nothing was recorded"
    assert post(api, "mysql").status_code == 202, "a smaller instance still fits: 64 MiB"


def test_stopped_and_failed_instances_reserve_no_memory(api, create, act, fake, settings):
    settings.STOCKROOM_MEMORY_BUDGET = 2 * REDIS
    settings.STOCKROOM_MAX_RESTARTS = 0
    first, second = create(), create()
    assert post(api).status_code == 503

    act(first, "stop")
    third = create()
    assert third["status"] == "running", "a stopped instance reserves nothing until it starts"

    fake.kill(second["id"])
    reconcile()  # unhealthy, then given up at once: failed, its data kept
    assert Instance.objects.get(pk=second["id"]).status == Status.FAILED
    assert create()["status"] == "running", "nor does a failed one: no server runs"


def test_a_start_beyond_the_budget_is_refused_and_the_instance_stays_stopped(
    api, outsider, create, act, fake, settings
):
    settings.STOCKROOM_MEMORY_BUDGET = 2 * REDIS
    first = create()
    act(first, "stop")
    assert post(outsider).status_code == 202
    assert post(api).status_code == 202  # the budget is full again

    response = api.post(f"/api/storage/redis/instances/{first['id']}/start")
    assert response.status_code == 503
    assert response.json()["detail"].startswith(
        f"The host has no room for {first['name']}: it needs 80 MiB of memory, and instances reserve 160 MiB "
        "of the host's 160 MiB budget."
    )
    stopped = Instance.objects.get(pk=first["id"])
    assert stopped.status == Status.STOPPED
    assert [event.to_status for event in stopped.events.all()][-1] == "stopped", "no event for a refused start"
    assert fake.called("start") == []

    settings.STOCKROOM_MEMORY_BUDGET = 3 * REDIS
    assert act(first, "start")["status"] == "running"


def test_a_refused_start_shows_its_reason_on_the_page(client, alice, create, act, settings):
    settings.STOCKROOM_MEMORY_BUDGET = REDIS
    first = create()
    act(first, "stop")
    create()
    client.force_login(alice)
    page = client.post(f"/instances/{first['id']}/start/", follow=True).content.decode()
    assert "The host has no room for" in page
    assert Instance.objects.get(pk=first["id"]).status == Status.STOPPED


def test_a_refused_create_shows_its_reason_on_the_form(client, alice, settings):
    settings.STOCKROOM_MEMORY_BUDGET = 10 * MiB
    client.force_login(alice)
    response = client.post("/new/redis/", {})
    assert response.status_code == 200
    assert "The host has no room for a new Redis instance" in response.content.decode()
    assert not Instance.objects.exists()


# Each user's memory quota ---------------------------------------------------------------


def test_a_create_beyond_the_memory_quota_answers_403(api, outsider, settings):
    settings.STOCKROOM_MEMORY_QUOTA = 150 * MiB
    assert post(api).status_code == 202
    response = post(api)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "Memory quota reached: your instances reserve 80 MiB of your 150 MiB quota, and a new Redis "
        "instance needs 80 MiB. Stop or delete one of yours first, or choose smaller options."
    )
    assert post(api, "redis", maxmemory="32mb").status_code == 202, "a smaller one fits: 48 MiB"
    assert post(outsider).status_code == 202, "the quota is each user's own"


def test_options_that_ask_for_more_than_the_quota_are_refused_at_once(api, settings):
    settings.STOCKROOM_MEMORY_QUOTA = 256 * MiB
    response = post(api, maxmemory="256mb")
    assert response.status_code == 403
    assert "reserve 0 MiB" not in response.json()["detail"]
    assert "your 256 MiB quota, and a new Redis instance needs 272 MiB" in response.json()["detail"]


def test_a_start_beyond_the_memory_quota_answers_403(api, create, act, settings):
    settings.STOCKROOM_MEMORY_QUOTA = REDIS
    first = create()
    act(first, "stop")
    create()
    response = api.post(f"/api/storage/redis/instances/{first['id']}/start")
    assert response.status_code == 403
    assert "your instances reserve 80 MiB of your 80 MiB quota" in response.json()["detail"]
    assert Instance.objects.get(pk=first["id"]).status == Status.STOPPED


def test_the_admin_start_action_reports_a_refusal(admin_client, create, act, settings):
    settings.STOCKROOM_MEMORY_BUDGET = REDIS
    first = create()
    act(first, "stop")
    create()
    page = admin_client.post(
        "/admin/provisioning/instance/", {"action": "start_instances", "_selected_action": [first["id"]]}, follow=True
    ).content.decode()
    assert "Asked the worker to start 0 instance(s)." in page
    assert "The host has no room for" in page


def test_the_admin_list_shows_reservations_and_limits(admin_client, create):
    create("redis", maxmemory="256mb")
    page = admin_client.get("/admin/provisioning/instance/").content.decode()
    assert "272 MiB" in page and "448 MiB" in page


# The count quota covers every instance that holds data ---------------------------------


def test_a_failed_instance_that_kept_its_data_still_counts(api, create, act, fake, settings):
    settings.STOCKROOM_QUOTA = 1
    settings.STOCKROOM_MAX_RESTARTS = 0
    instance = create()
    fake.kill(instance["id"])
    reconcile()  # the healer gives up at once; the data is kept until the owner deletes it
    failed = Instance.objects.get(pk=instance["id"])
    assert (failed.status, failed.holds_data) == (Status.FAILED, True)
    assert fake.server(failed.pk) is not None

    response = post(api)
    assert response.status_code == 403
    assert response.json()["detail"] == (
        "Quota reached: you have 1 instances and the limit is 1. Failed instances whose data is kept "
        "count until you delete them. Delete one first."
    )
    assert act(instance, "delete") == {"status": "gone"}
    assert create()["status"] == "running"


def test_a_failed_create_whose_data_was_removed_does_not_count(api, create, fake, settings):
    settings.STOCKROOM_QUOTA = 1
    fake.fail_next("create", BackendError("no room"))
    failed = Instance.objects.get(pk=create()["id"])
    assert (failed.status, failed.holds_data) == (Status.FAILED, False)
    assert create()["status"] == "running"


def test_a_failed_create_that_could_not_be_cleaned_up_counts(api, create, fake, settings):
    settings.STOCKROOM_QUOTA = 1
    fake.fail_next("create", BackendError("no room"))
    fake.fail_next("destroy", BackendError("device busy"))
    failed = Instance.objects.get(pk=create()["id"])
    assert (failed.status, failed.holds_data) == (Status.FAILED, True)
    assert "Cleaning up also failed" in failed.status_message
    assert post(api).status_code == 403


def test_a_failed_delete_counts_until_a_delete_succeeds(api, create, act, fake, settings):
    settings.STOCKROOM_QUOTA = 1
    instance = create()
    fake.fail_next("destroy", BackendError("device busy"))
    assert act(instance, "delete")["status"] == "failed"
    assert Instance.objects.get(pk=instance["id"]).holds_data
    assert post(api).status_code == 403
    assert act(instance, "delete") == {"status": "gone"}
    deleted = Instance.objects.get(pk=instance["id"])
    assert (deleted.status, deleted.holds_data) == (Status.DELETED, False)
    assert create()["status"] == "running"


# No race overshoots a limit ---------------------------------------------------------------


class SlowFakeBackend(FakeBackend):
    """Widens the window between a create's checks and its insert, where a race would slip in."""

    def port_is_free(self, port: int) -> bool:
        time.sleep(0.05)
        return super().port_is_free(port)


def create_at_once(owners, settings) -> list[str]:
    """Every owner asks for a default Redis at the same moment; returns each outcome's name."""
    settings.STOCKROOM_BACKENDS = {**settings.STOCKROOM_BACKENDS, "fake": {"BACKEND": f"{__name__}.SlowFakeBackend"}}
    start = threading.Barrier(len(owners))
    outcomes: list[str] = []

    def create(owner) -> None:
        try:
            start.wait()
            services.create_instance(owner=owner, kind="redis", options={})
            outcomes.append("created")
        except (services.QuotaExceeded, services.NoCapacity) as exc:
            outcomes.append(type(exc).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return sorted(outcomes)


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_of_many_users_never_overshoot_the_budget(django_user_model, settings):
    settings.STOCKROOM_MEMORY_BUDGET = 3 * REDIS
    owners = [django_user_model.objects.create_user(f"user{i}") for i in range(6)]
    outcomes = create_at_once(owners, settings)
    assert outcomes == ["NoCapacity"] * 3 + ["created"] * 3
    assert sum(Instance.objects.values_list("memory_reservation", flat=True)) == 3 * REDIS


@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_of_one_user_never_overshoot_the_quota(django_user_model, settings):
    settings.STOCKROOM_MEMORY_QUOTA = 2 * REDIS
    alice = django_user_model.objects.create_user("alice")
    outcomes = create_at_once([alice] * 5, settings)
    assert outcomes == ["QuotaExceeded"] * 3 + ["created"] * 2
    assert Instance.objects.filter(owner=alice).count() == 2


# Settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("16gb", 16 * 1024**3), ("512MB", 512 * MiB), ("1073741824", 1024**3)])
def test_memory_settings_take_sizes(monkeypatch, value, expected):
    monkeypatch.setenv("STOCKROOM_MEMORY_BUDGET", value)
    assert portal_settings._memory_size("STOCKROOM_MEMORY_BUDGET", "75%") == expected


def test_the_budget_defaults_to_three_quarters_of_the_host(monkeypatch):
    monkeypatch.delenv("STOCKROOM_MEMORY_BUDGET", raising=False)
    total = portal_settings._host_memory()
    with open("/proc/meminfo") as meminfo:
        assert f"{total // 1024} kB" in meminfo.readline()
    assert portal_settings._memory_size("STOCKROOM_MEMORY_BUDGET", "75%") == total * 3 // 4


@pytest.mark.parametrize("value", ["lots", "-5%", "0", "16tb"])
def test_a_bad_memory_setting_fails_at_start_up(monkeypatch, value):
    monkeypatch.setenv("STOCKROOM_MEMORY_QUOTA", value)
    with pytest.raises(ImproperlyConfigured, match="STOCKROOM_MEMORY_QUOTA"):
        portal_settings._memory_size("STOCKROOM_MEMORY_QUOTA", "4gb")
