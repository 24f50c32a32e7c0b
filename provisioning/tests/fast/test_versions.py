"""Engine versions over the fake backend: what the worker records, when an instance is flagged
*restart to upgrade*, and what a restart does. The real servers' side is in test_versions.py."""

import pytest
from django.test import Client

from provisioning.backends.base import BackendError
from provisioning.models import Instance
from provisioning.services.versions import UPGRADED

from .conftest import reconcile

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(client, alice) -> Client:
    client.force_login(alice)
    return client


@pytest.fixture
def admin(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    return client


def upgrades(pk: int) -> list[str]:
    return list(Instance.objects.get(pk=pk).events.filter(type=UPGRADED).values_list("reason", flat=True))


def test_a_create_records_the_servers_version_and_is_not_flagged(create, fake):
    instance = create("redis")
    assert instance["server_version"] == "1.0.0-fake"
    assert instance["upgrade_available"] is False
    assert fake.called("upgrade") == [], "a new server made its own data: nothing to upgrade"


def test_new_binaries_flag_the_instance_until_a_restart_upgrades_it(api, create, act, fake, web):
    instance = create("mysql")
    fake.version = "1.1.0-fake"  # the host's packages moved on; the server runs the old binaries
    url = f"/api/storage/mysql/instances/{instance['id']}"
    assert api.get(url).json()["upgrade_available"] is True
    assert api.get("/api/storage/mysql/instances").json()["results"][0]["upgrade_available"] is True
    page = web.get(f"/instances/{instance['id']}/").content.decode()
    assert 'id="upgrade-available"' in page and "1.0.0-fake" in page

    after = act(instance, "restart")

    assert after["status"] == "running"
    assert after["server_version"] == "1.1.0-fake"
    assert after["upgrade_available"] is False
    assert fake.called("upgrade") == [instance["id"]]
    assert upgrades(instance["id"]) == [
        "Upgraded from 1.0.0-fake to 1.1.0-fake: Upgraded the fake's data to 1.1.0-fake."
    ]
    assert "Upgraded from 1.0.0-fake to 1.1.0-fake" in after["status_message"]
    assert 'id="upgrade-available"' not in web.get(f"/instances/{instance['id']}/").content.decode()


def test_a_start_of_a_stopped_instance_upgrades_too(create, act, fake):
    instance = create("redis")
    act(instance, "stop")
    fake.version = "1.1.0-fake"
    after = act(instance, "start")
    assert after["server_version"] == "1.1.0-fake" and not after["upgrade_available"]
    assert len(upgrades(instance["id"])) == 1


def test_a_restart_on_the_same_binaries_runs_no_upgrade(create, act, fake):
    instance = create("redis")
    act(instance, "restart")
    assert fake.called("upgrade") == [] and upgrades(instance["id"]) == []


def test_a_failed_upgrade_keeps_the_flag_and_says_so(create, act, fake):
    instance = create("mysql")
    fake.version = "1.1.0-fake"
    fake.fail_next("upgrade", BackendError("mariadb-upgrade: Table 'mysql.proc' is marked as crashed"))
    after = act(instance, "restart")
    assert after["status"] == "running", "the server runs: only its data is behind"
    assert after["server_version"] == "1.0.0-fake" and after["upgrade_available"] is True
    assert "bringing its data up to it failed" in after["status_message"]
    assert "Restart it to try again" in upgrades(instance["id"])[0]
    again = act(instance, "restart")
    assert again["server_version"] == "1.1.0-fake" and not again["upgrade_available"]


def test_a_version_that_cannot_be_read_does_not_fail_the_start(create, act, fake):
    instance = create("redis")
    fake.fail_next("server_version", BackendError("no answer"))
    after = act(instance, "restart")
    assert after["status"] == "running" and after["server_version"] == "1.0.0-fake"


def test_the_healer_restart_records_the_new_version(create, fake):
    instance = create("redis")
    fake.kill(instance["id"])
    fake.version = "1.1.0-fake"
    assert reconcile().heals == [instance["id"]]  # marked unhealthy and restarted
    row = Instance.objects.get(pk=instance["id"])
    assert row.status == "running" and row.server_version == "1.1.0-fake"
    assert len(upgrades(instance["id"])) == 1


def test_an_instance_never_started_is_not_flagged(api, fake, create):
    instance = create("redis")
    Instance.objects.filter(pk=instance["id"]).update(server_version="")  # made before versions were recorded
    fake.version = "1.1.0-fake"
    assert api.get(f"/api/storage/redis/instances/{instance['id']}").json()["upgrade_available"] is False


def test_the_admin_shows_the_version_and_filters_on_the_flag(create, fake, admin):
    old, new = create("redis"), create("redis")
    fake.version = "1.1.0-fake"
    Instance.objects.filter(pk=new["id"]).update(server_version="1.1.0-fake")
    page = admin.get("/admin/provisioning/instance/").content.decode()
    assert "1.0.0-fake (restart to upgrade)" in page
    flagged = admin.get("/admin/provisioning/instance/?upgrade=yes").context["cl"].result_list
    current = admin.get("/admin/provisioning/instance/?upgrade=no").context["cl"].result_list
    assert [i.pk for i in flagged] == [old["id"]]
    assert [i.pk for i in current] == [new["id"]]


def test_the_schema_describes_the_version_fields(api):
    schema = api.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    fields = schema["components"]["schemas"]["Instance"]["properties"]
    assert fields["upgrade_available"]["type"] == "boolean"
    assert "restart" in fields["upgrade_available"]["description"].lower()
    assert fields["server_version"]["readOnly"] is True
