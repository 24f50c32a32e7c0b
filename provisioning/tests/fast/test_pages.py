"""Server-rendered pages: they call the same services as the API."""

import re

import pytest
from django.test import Client

from provisioning.models import Instance, Status

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def admin(django_user_model) -> Client:
    """olga, an operator."""
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    return client


def test_pages_need_a_signed_in_user(client):
    for url in ("/", "/new/redis/", "/token/", "/webhooks/"):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/")


def test_the_empty_dashboard_explains_what_to_do(web):
    page = web.get("/").content.decode()
    assert "No instances yet" in page
    assert 'href="/new/mysql/"' in page and 'href="/new/redis/"' in page


def test_the_form_is_built_from_the_option_definitions(web):
    page = web.get("/new/redis/").content.decode()
    for label in ("Memory limit", "Eviction policy", "Maximum clients", "Append-only fsync"):
        assert label in page
    assert 'value="64mb"' in page
    assert "allkeys-lru" in page


def test_a_bad_value_is_shown_at_its_field(web):
    response = web.post("/new/redis/", {"maxmemory": "9gb", "maxclients": "100"})
    assert response.status_code == 200
    page = response.content.decode()
    assert 'id="maxmemory-error"' in page and "1mb to 4gb" in page
    assert not Instance.objects.exists()


def test_creating_goes_to_the_instance_page(web):
    response = web.post("/new/mysql/", {"name": "shop", "charset": "latin1", "binlog_format": "ROW"})
    instance = Instance.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/instances/{instance.pk}/"
    assert instance.options["charset"] == "latin1"
    page = web.get(response["Location"]).content.decode()
    assert "provisioning" in page and 'data-busy="true"' in page


def test_an_outsider_gets_404_on_every_page(web, charlie):
    web.post("/new/redis/", {})
    pk = Instance.objects.get().pk
    outsider = Client()
    outsider.force_login(charlie)
    for url in (f"/instances/{pk}/", f"/instances/{pk}/panel/", f"/instances/{pk}/delete/"):
        assert outsider.get(url).status_code == 404
    for action in ("delete", "stop", "start", "restart", "rotate-password"):
        assert outsider.post(f"/instances/{pk}/{action}/").status_code == 404
    assert Instance.objects.get().status == Status.PROVISIONING


def test_forms_are_protected_against_csrf(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post("/new/redis/", {}).status_code == 403
    assert not Instance.objects.exists()


def test_the_token_page_creates_a_token_and_shows_it_once(web):
    assert "no token yet" in web.get("/token/").content.decode()
    response = web.post("/token/", {"name": "laptop", "expires_in": "30d"})
    secret = response.context["new"].secret
    assert secret in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    page = web.get("/token/").content.decode()
    assert "laptop" in page and secret not in page


def test_staff_see_every_instance_in_the_admin(web, admin, charlie):
    web.post("/new/redis/", {"name": "alices"})
    page = admin.get("/admin/provisioning/instance/").content.decode()
    assert "alices" in page
    outsider = Client()
    outsider.force_login(charlie)
    assert outsider.get("/admin/provisioning/instance/").status_code == 302


def test_the_admin_delete_action_goes_through_the_service(web, admin):
    web.post("/new/redis/", {})
    instance = Instance.objects.get()
    Instance.objects.filter(pk=instance.pk).update(status=Status.RUNNING)
    admin.post("/admin/provisioning/instance/", {"action": "delete_instances", "_selected_action": [instance.pk]})
    instance.refresh_from_db()
    assert instance.status == Status.DELETING
    assert instance.events.last().reason == "Deletion requested by olga."


def test_a_deleted_instance_page_leads_back_to_the_dashboard(web):
    web.post("/new/redis/", {})
    instance = Instance.objects.get()
    Instance.objects.filter(pk=instance.pk).update(status=Status.DELETED)
    response = web.get(f"/instances/{instance.pk}/")
    assert response.status_code == 302 and response["Location"] == "/"
    assert web.get(f"/instances/{instance.pk}/panel/").status_code == 404


def running(web) -> Instance:
    web.post("/new/redis/", {})
    instance = Instance.objects.get()
    Instance.objects.filter(pk=instance.pk).update(status=Status.RUNNING)
    return instance


def buttons(page: bytes) -> list[str]:
    return re.findall(r'data-action="([a-z-]+)"', page.decode())


def test_the_page_offers_the_actions_the_status_allows(web):
    instance = running(web)
    page = web.get(f"/instances/{instance.pk}/").content
    lifetime = ["extend", "protect"]  # in every status but deleting and deleted
    assert buttons(page) == ["settings", *lifetime, "stop", "restart", "rotate-password", "snapshot", "import"]
    Instance.objects.filter(pk=instance.pk).update(status=Status.STOPPED)
    assert buttons(web.get(f"/instances/{instance.pk}/panel/").content) == [*lifetime, "start"]
    Instance.objects.filter(pk=instance.pk).update(status=Status.PROVISIONING)
    assert buttons(web.get(f"/instances/{instance.pk}/panel/").content) == lifetime
    Instance.objects.filter(pk=instance.pk).update(status=Status.DELETING)
    assert buttons(web.get(f"/instances/{instance.pk}/panel/").content) == []


def test_an_action_from_the_page_goes_through_the_service(web):
    instance = running(web)
    response = web.post(f"/instances/{instance.pk}/restart/")
    assert response.status_code == 302 and response["Location"] == f"/instances/{instance.pk}/"
    instance.refresh_from_db()
    assert instance.status == Status.RESTARTING
    assert instance.events.last().reason == "Restart requested by alice."

    page = web.post(f"/instances/{instance.pk}/start/", follow=True).content.decode()
    assert "Cannot start an instance that is restarting." in page
    assert web.post(f"/instances/{instance.pk}/explode/").status_code == 404
    assert web.get(f"/instances/{instance.pk}/restart/").status_code == 405


def test_the_admin_restart_action_goes_through_the_service(web, admin):
    instance = running(web)
    admin.post("/admin/provisioning/instance/", {"action": "restart_instances", "_selected_action": [instance.pk]})
    instance.refresh_from_db()
    assert instance.status == Status.RESTARTING
    assert instance.events.last().reason == "Restart requested by olga."


def test_the_admin_shows_an_instance_but_edits_nothing_and_hides_passwords(web, admin):
    instance = running(web)
    page = admin.get(f"/admin/provisioning/instance/{instance.pk}/change/").content.decode()
    assert instance.name in page and "Requested by alice." in page
    for field in ("name", "status", "port", "claimed_until", "restart_attempts", "password", "admin_password"):
        assert f'name="{field}"' not in page
    assert instance.password not in page and instance.admin_password not in page
