"""Expiry, protection and stop-when-idle: the owner's words, and what a reconcile pass does with them."""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from provisioning.models import Instance, InstanceEvent, Status, Webhook, WebhookDelivery
from provisioning.services import lifetime

from .conftest import reconcile

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


# lifetime.clean ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("words", "expires_at"),
    [
        ("90s", NOW + timedelta(seconds=90)),
        ("30m", NOW + timedelta(minutes=30)),
        ("2h", NOW + timedelta(hours=2)),
        (" 7D ", NOW + timedelta(days=7)),
        ("2w", NOW + timedelta(weeks=2)),
        (None, None),
        ("never", None),
    ],
)
def test_expires_in_is_a_duration_from_now(words, expires_at):
    assert lifetime.clean({"expires_in": words}, now=NOW) == {"expires_at": expires_at, "expiry_warned_at": None}


@pytest.mark.parametrize(
    ("words", "expires_at"),
    [
        ("2030-01-02T08:00:00Z", datetime(2030, 1, 2, 8, tzinfo=UTC)),
        ("2030-01-02T09:00:00+01:00", datetime(2030, 1, 2, 8, tzinfo=UTC)),
        ("2030-01-02 08:00", datetime(2030, 1, 2, 8, tzinfo=UTC)),  # no zone: UTC
        (datetime(2030, 1, 2, 8, tzinfo=UTC), datetime(2030, 1, 2, 8, tzinfo=UTC)),
        (None, None),
    ],
)
def test_expires_at_is_a_time_in_the_future(words, expires_at):
    assert lifetime.clean({"expires_at": words}, now=NOW) == {"expires_at": expires_at, "expiry_warned_at": None}


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"expires_in": "2"}, "expires_in", '"2h"'),  # a unit is required
        ({"expires_in": 2}, "expires_in", '"7d"'),
        ({"expires_in": "0h"}, "expires_in", "no time at all"),
        ({"expires_in": "-2h"}, "expires_in", "or null"),
        ({"expires_in": "soon"}, "expires_in", '"30m"'),
        ({"expires_in": "99999w"}, "expires_in", "at most 3650 days"),
        ({"expires_in": True}, "expires_in", "never"),
        ({"expires_at": "2029-12-31T00:00:00Z"}, "expires_at", "not in the future"),
        ({"expires_at": "2030-02-30T00:00:00Z"}, "expires_at", "ISO 8601"),
        ({"expires_at": "tomorrow"}, "expires_at", "ISO 8601"),
        ({"expires_at": 1893456000}, "expires_at", "ISO 8601"),
        ({"expires_at": "2099-01-01T00:00:00Z"}, "expires_at", "3650 days"),
        ({"expires_in": "2h", "expires_at": "2030-01-02T08:00:00Z"}, "expires_at", "not both"),
        ({"protected": "yes"}, "protected", "true or false"),
        ({"stop_when_idle": "30s"}, "stop_when_idle", "from 1m to 30d"),
        ({"stop_when_idle": 59}, "stop_when_idle", "from 1m to 30d"),
        ({"stop_when_idle": "31d"}, "stop_when_idle", "out of range"),
        ({"stop_when_idle": "1800"}, "stop_when_idle", "whole number of seconds"),
        ({"stop_when_idle": 0}, "stop_when_idle", '"30m"'),
        ({"stop_when_idle": 1.5}, "stop_when_idle", '"30m"'),
    ],
)
def test_bad_words_are_refused_naming_the_field_and_the_forms_it_takes(data, field, hint):
    with pytest.raises(ValidationError) as refused:
        lifetime.clean(data, now=NOW)
    assert list(refused.value.message_dict) == [field]
    assert hint in refused.value.message_dict[field][0]


def test_every_bad_field_is_named_at_once():
    with pytest.raises(ValidationError) as refused:
        lifetime.clean({"expires_in": "x", "protected": 1, "stop_when_idle": "x"}, now=NOW)
    assert set(refused.value.message_dict) == {"expires_in", "protected", "stop_when_idle"}


def test_only_the_fields_given_change_and_others_are_ignored():
    assert lifetime.clean({"name": "x", "maxmemory": "1gb"}, now=NOW) == {}
    assert lifetime.clean({"protected": True}, now=NOW) == {"protected": True}
    assert lifetime.clean({"protected": None}, now=NOW) == {"protected": False}  # null: its default
    assert lifetime.clean({"expires_in": None, "expires_at": None}, now=NOW) == {
        "expires_at": None,
        "expiry_warned_at": None,
    }


@pytest.mark.parametrize(("words", "seconds"), [("30m", 1800), ("1m", 60), (3600, 3600), ("30d", 2592000)])
def test_stop_when_idle_is_seconds_and_restarts_the_idle_count(words, seconds):
    assert lifetime.clean({"stop_when_idle": words}, now=NOW) == {"stop_when_idle": seconds, "idle_since": None}
    assert lifetime.clean({"stop_when_idle": None}, now=NOW) == {"stop_when_idle": None, "idle_since": None}


def test_a_create_without_an_expiry_gets_the_default_ttl(settings):
    settings.STOCKROOM_DEFAULT_TTL = timedelta(days=7)
    assert lifetime.for_create({}, now=NOW)["expires_at"] == NOW + timedelta(days=7)
    assert lifetime.for_create({"expires_in": "2h"}, now=NOW)["expires_at"] == NOW + timedelta(hours=2)
    assert lifetime.for_create({"expires_in": None}, now=NOW)["expires_at"] is None  # asked for never
    settings.STOCKROOM_DEFAULT_TTL = None
    assert lifetime.for_create({}, now=NOW)["expires_at"] is None


def test_spans_are_said_as_people_say_them():
    said = [lifetime.spoken(timedelta(seconds=s)) for s in (45, 1800, 3 * 3600 - 10, 5400, 3 * 86400)]
    assert said == ["45 s", "30 min", "3 h", "90 min", "3 days"]


# The API ----------------------------------------------------------------------------------


def close_to(moment: str, expected: datetime) -> bool:
    return abs(datetime.fromisoformat(moment) - expected) < timedelta(seconds=30)


def test_a_create_sets_the_lifetime(create):
    instance = create("redis", expires_in="2h", protected=True, stop_when_idle="30m")
    assert close_to(instance["expires_at"], timezone.now() + timedelta(hours=2))
    assert (instance["protected"], instance["stop_when_idle"], instance["idle_since"]) == (True, 1800, None)
    assert instance["options"] == create("redis")["options"], "none of it is an option"


def test_a_create_by_form_treats_blanks_as_left_out(api, settings):
    settings.STOCKROOM_DEFAULT_TTL = timedelta(days=1)
    body = "expires_in=&expires_at=&stop_when_idle=&protected=false"
    response = api.post("/api/storage/redis/instances", body, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 202, response.content
    assert close_to(response.json()["expires_at"], timezone.now() + timedelta(days=1))
    assert response.json()["stop_when_idle"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"expires_in": "2 hours"}, "expires_in"),
        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"),
        ({"stop_when_idle": "5s"}, "stop_when_idle"),
        ({"expires_in": "1h", "expires_at": "2099-01-01T00:00:00Z"}, "expires_at"),
    ],
)
def test_a_create_with_bad_lifetime_words_is_400_naming_the_field_and_makes_nothing(api, body, field):
    response = api.post("/api/storage/redis/instances", body, format="json")
    assert response.status_code == 400
    assert list(response.json()) == [field]
    assert not Instance.objects.exists()


def test_the_schema_documents_the_lifetime(client):
    document = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    schemas = document["components"]["schemas"]
    shown = schemas["Instance"]["properties"]
    assert {"expires_at", "protected", "stop_when_idle", "idle_since"} <= set(shown)
    create = schemas["RedisCreate"]["properties"]
    assert create["expires_in"] == create["expires_in"] | {"type": "string", "nullable": True}
    assert "STOCKROOM_DEFAULT_TTL" in create["expires_in"]["description"]
    assert create["expires_at"]["format"] == "date-time"
    form = schemas["RedisCreateForm"]["properties"]
    assert not form["expires_in"].get("nullable")
    extend = document["paths"]["/api/storage/{kind}/instances/{id}/extend/"]["post"]
    assert set(extend["responses"]) >= {"200", "400", "404", "409"}


def url(instance: dict) -> str:
    return f"/api/storage/{instance['kind']}/instances/{instance['id']}"


def test_extend_moves_the_expiry_and_says_so_in_the_history(api, create):
    instance = create("redis", expires_in="1h")
    Instance.objects.filter(pk=instance["id"]).update(expiry_warned_at=timezone.now())
    response = api.post(f"{url(instance)}/extend", {"expires_in": "1d"}, format="json")
    assert response.status_code == 200, response.content
    assert close_to(response.json()["expires_at"], timezone.now() + timedelta(days=1))
    row = Instance.objects.get(pk=instance["id"])
    assert row.expiry_warned_at is None, "the new expiry is warned of again"
    event = row.events.last()
    assert (event.type, event.from_status, event.to_status) == ("instance.expiry_changed", "running", "running")
    assert event.reason.startswith("It now expires at ") and event.reason.endswith("(by alice).")

    response = api.post(f"{url(instance)}/extend", {"expires_at": "2031-05-01T10:00:00Z"}, format="json")
    assert response.json()["expires_at"] == "2031-05-01T10:00:00Z"
    assert api.post(f"{url(instance)}/extend", {"expires_in": None}, format="json").json()["expires_at"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [({}, "expires_in"), ({"expires_in": "later"}, "expires_in"), ({"expires_at": "2001-01-01"}, "expires_at")],
)
def test_extend_with_bad_words_is_400(api, create, body, field):
    instance = create("redis", expires_in="1h")
    before = Instance.objects.get(pk=instance["id"]).expires_at
    response = api.post(f"{url(instance)}/extend", body, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert Instance.objects.get(pk=instance["id"]).expires_at == before


def test_extend_of_another_users_instance_is_404(create, outsider):
    instance = create("redis", expires_in="1h")
    response = outsider.post(f"{url(instance)}/extend", {"expires_in": "7d"}, format="json")
    assert response.status_code == 404
    assert close_to(Instance.objects.get(pk=instance["id"]).expires_at.isoformat(), timezone.now() + timedelta(hours=1))


def test_extend_is_allowed_while_stopped_or_failed_and_refused_while_deleting(api, create, act):
    instance = act(create("redis", expires_in="1h"), "stop")
    assert api.post(f"{url(instance)}/extend", {"expires_in": "2h"}, format="json").status_code == 200
    Instance.objects.filter(pk=instance["id"]).update(status=Status.FAILED, port=None)
    assert api.post(f"{url(instance)}/extend", {"expires_in": "2h"}, format="json").status_code == 200
    Instance.objects.filter(pk=instance["id"]).update(status=Status.DELETING)
    response = api.post(f"{url(instance)}/extend", {"expires_in": "2h"}, format="json")
    assert response.status_code == 409


def test_a_protected_instance_refuses_delete_with_409_until_cleared(api, create, act):
    instance = create("redis", protected=True)
    response = api.delete(url(instance))
    assert response.status_code == 409
    assert "clear `protected` first" in response.json()["detail"]
    assert Instance.objects.get(pk=instance["id"]).status == Status.RUNNING
    Instance.objects.filter(pk=instance["id"]).update(protected=False)
    assert act(instance, "delete")["status"] == "gone"


def test_the_page_and_the_admin_refuse_to_delete_a_protected_instance(web, admin_client, create):
    instance = create("redis", protected=True)
    response = web.post(f"/instances/{instance['id']}/delete/", follow=True)
    assert "is protected: clear `protected` first" in response.content.decode()
    response = admin_client.post(
        "/admin/provisioning/instance/",
        {"action": "delete_instances", "_selected_action": [instance["id"]]},
        follow=True,
    )
    assert "is protected" in response.content.decode()
    assert Instance.objects.get(pk=instance["id"]).status == Status.RUNNING


def test_a_failed_protected_instance_can_be_unprotected_then_deleted(web, create, act):
    instance = create("redis", protected=True)
    Instance.objects.filter(pk=instance["id"]).update(status=Status.FAILED, port=None)
    web.post(f"/instances/{instance['id']}/protect/", {"protected": "false"})
    assert act(instance, "delete")["status"] == "gone"


# Pages and admin --------------------------------------------------------------------------


def test_the_page_shows_the_badge_and_extends_and_protects(web, alice, create):
    instance = create("redis", expires_in="3h", stop_when_idle="30m")
    page = web.get(f"/instances/{instance['id']}/").content.decode()
    assert "expires in 3 h" in page
    assert "stops when idle after 30 min" in page
    assert "expires in 3 h" in web.get("/").content.decode(), "the dashboard shows it too"

    web.post(f"/instances/{instance['id']}/extend/", {"expires_in": "2d"})
    assert "expires in 2 days" in web.get(f"/instances/{instance['id']}/").content.decode()
    response = web.post(f"/instances/{instance['id']}/extend/", {"expires_in": "whenever"}, follow=True)
    assert "is not a duration such as" in response.content.decode()

    web.post(f"/instances/{instance['id']}/protect/", {"protected": "true"})
    assert Instance.objects.get(pk=instance["id"]).protected
    assert 'aria-pressed="true"' in web.get(f"/instances/{instance['id']}/").content.decode()
    web.post(f"/instances/{instance['id']}/protect/", {"protected": "false"})
    assert not Instance.objects.get(pk=instance["id"]).protected


def test_the_create_page_takes_the_lifetime(web):
    web.post("/new/redis/", {"expires_in": "2h", "stop_when_idle": "45m", "protected": "on"})
    instance = Instance.objects.get()
    assert (instance.stop_when_idle, instance.protected) == (2700, True)
    assert abs(instance.expires_at - timezone.now() - timedelta(hours=2)) < timedelta(seconds=30)
    page = web.post("/new/redis/", {"expires_in": "soon"}).content.decode()
    assert 'id="expires_in-error"' in page
    assert Instance.objects.count() == 1


def test_the_admin_extends_and_protects(admin_client, create):
    instance = create("redis", expires_in="1h")
    changelist = "/admin/provisioning/instance/"
    admin_client.post(changelist, {"action": "extend_instances", "_selected_action": [instance["id"]]})
    row = Instance.objects.get(pk=instance["id"])
    assert abs(row.expires_at - timezone.now() - timedelta(days=1)) < timedelta(seconds=30)
    admin_client.post(changelist, {"action": "protect_instances", "_selected_action": [instance["id"]]})
    assert Instance.objects.get(pk=instance["id"]).protected
    assert admin_client.get(f"{changelist}?protected__exact=1").content.decode().count(f"/{instance['id']}/change/")
    assert admin_client.get(f"{changelist}?expires_at__isempty=0").status_code == 200
    page = admin_client.get(f"{changelist}{instance['id']}/change/").content.decode()
    assert "Expires at" in page and "Protected" in page


# The reconciler ---------------------------------------------------------------------------


def events_of(pk: int, kind: str) -> list[InstanceEvent]:
    return list(InstanceEvent.objects.filter(instance_id=pk, type=kind))


def test_an_instance_is_warned_of_once_then_deleted_with_its_snapshot_kept(create, committed, alice, settings):
    settings.STOCKROOM_EXPIRY_WARNING = timedelta(hours=1)
    Webhook.objects.create(owner=alice, url="http://127.0.0.1:9/hook", secret="whsec_x")
    pk = create("redis", expires_in="2h")["id"]
    assert reconcile().expiring == []
    with committed():
        assert reconcile(later=3600 + 60).expiring == [pk]
        assert reconcile(later=3600 + 120).expiring == [], "once"
    (warning,) = events_of(pk, "instance.expiring")
    assert warning.reason.startswith("Expires at ") and "(in 59 min)" in warning.reason
    assert WebhookDelivery.objects.filter(event=warning).count() == 1, "webhooks get it"

    with committed():
        report = reconcile(later=7200 + 1)
    assert report.expired == [pk]
    instance = Instance.objects.get(pk=pk)
    assert instance.status == Status.DELETED
    deleting = instance.events.get(to_status=Status.DELETING)
    assert deleting.reason.startswith("Expired at ")
    assert instance.snapshots.get(trigger="before-delete").status == "ready"


def test_an_extend_warns_again_before_the_new_expiry(api, create, committed):
    instance = create("redis", expires_in="30m")
    with committed():
        assert reconcile().expiring == [instance["id"]]
    api.post(f"{url(instance)}/extend", {"expires_in": "2h"}, format="json")
    assert reconcile().expiring == []
    assert reconcile(later=3600 + 60).expiring == [instance["id"]]


def test_a_protected_or_busy_instance_is_not_expired(create, act, committed):
    protected = create("redis", expires_in="1m", protected=True)["id"]
    busy = create("redis", expires_in="1m")["id"]
    Instance.objects.filter(pk=busy).update(status=Status.RESTORING)
    with committed():  # (not yet long enough for the busy one to count as stuck)
        report = reconcile(later=65)
    assert report.expired == []
    assert report.expiring == [busy], "a busy one is warned of, and deleted once it is free"
    assert Instance.objects.get(pk=protected).status == Status.RUNNING
    Instance.objects.filter(pk=busy).update(status=Status.RUNNING)
    with committed():
        assert reconcile(later=65).expired == [busy]


def test_an_idle_instance_is_stopped_after_stop_when_idle(create, committed, fake, api):
    instance = create("redis", stop_when_idle="30m")
    pk = instance["id"]
    reconcile()
    since = Instance.objects.get(pk=pk).idle_since
    assert since is not None
    assert reconcile(later=29 * 60).idle_stopped == []
    with committed():
        assert reconcile(later=30 * 60 + 10).idle_stopped == [pk]
    row = Instance.objects.get(pk=pk)
    assert row.status == Status.STOPPED
    assert row.events.get(to_status=Status.STOPPING).reason.startswith("No client connected for 30 min")

    with committed():
        assert api.post(f"{url(instance)}/start").status_code == 202
    row = Instance.objects.get(pk=pk)
    assert (row.status, row.idle_since) == (Status.RUNNING, None), "a start counts afresh"


def test_a_client_connection_keeps_it_running_and_resets_the_count(create, committed, fake):
    pk = create("redis", stop_when_idle="30m")["id"]
    reconcile()
    fake.connect(pk)
    assert reconcile(later=40 * 60).idle_stopped == []
    assert Instance.objects.get(pk=pk).idle_since is None
    fake.connect(pk, -1)
    reconcile(later=50 * 60)
    assert reconcile(later=70 * 60).idle_stopped == []
    assert Instance.objects.get(pk=pk).status == Status.RUNNING


def test_instances_without_stop_when_idle_are_not_asked(create, fake):
    create("redis")
    reconcile(later=86400)
    assert fake.called("client_connections") == []
