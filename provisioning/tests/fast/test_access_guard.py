"""Attacks on the portal's own doors, replayed: guessing passwords on the sign-in and admin login
pages, a view-only operator deleting through the admin's action menu (a forged POST included),
responses with secrets kept by caches, and /healthz telling outsiders how the portal is built.
The real-tier twin, test_access_guard.py one folder up, forges the admin POST against a real server."""

import pytest
from axes.exceptions import AxesBackendRequestParameterRequired
from axes.models import AccessAttempt
from django.contrib import admin
from django.contrib.auth import authenticate
from django.contrib.auth.models import Permission
from django.test import Client, RequestFactory
from rest_framework.test import APIClient

from provisioning import health
from provisioning.models import Instance, Status

from ..conftest import client_for

pytestmark = pytest.mark.django_db

SIGN_IN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"
ALICE_PASSWORD = "correct-horse-battery"  # the alice fixture's


def sign_in(client: Client, username: str, password: str, *, page: str = SIGN_IN, address: str = "127.0.0.1"):
    return client.post(page, {"username": username, "password": password}, REMOTE_ADDR=address)


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def fail(times: int, username: str = "alice", **where) -> None:
    for _ in range(times):
        assert sign_in(Client(), username, "wrong-guess", **where).status_code == 200  # the form, with its error


def lock_out(limit: int, username: str = "alice") -> None:
    """Wrong passwords up to the limit; the one that reaches it is already answered with the lock-out."""
    fail(limit - 1, username)
    assert sign_in(Client(), username, "wrong-guess").status_code == 429


def staff(django_user_model, name: str, *codenames: str):
    """A staff user holding exactly these permissions (codenames such as "view_instance")."""
    user = django_user_model.objects.create_user(name, password="staff-password-1", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return django_user_model.objects.get(pk=user.pk)  # no cached permissions


def client_of(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


# Sign-in lock-out -----------------------------------------------------------------------------


def test_one_failure_short_of_the_limit_the_right_password_still_signs_in(alice, settings):
    fail(settings.AXES_FAILURE_LIMIT - 1)
    client = Client()
    assert sign_in(client, "alice", ALICE_PASSWORD).status_code == 302
    assert signed_in(client)


def test_the_sign_in_page_locks_out_even_the_right_password(alice, settings):
    assert settings.AXES_FAILURE_LIMIT == 10 and settings.STOCKROOM_LOGIN_COOLOFF == 15 * 60  # the defaults
    lock_out(settings.AXES_FAILURE_LIMIT)

    client = Client()
    response = sign_in(client, "alice", ALICE_PASSWORD)
    assert response.status_code == 429
    assert not signed_in(client)
    assert client.get("/").status_code == 302, "not signed in"
    page = response.content.decode()
    assert "Sign-in paused" in page and "Try again after" in page and "15 minutes from now" in page
    assert "ask an operator" in page.lower()
    assert response["Retry-After"] == "900"
    assert "no-store" in response["Cache-Control"]
    stored = str(list(AccessAttempt.objects.values()))
    assert "wrong-guess" not in stored and ALICE_PASSWORD not in stored, "no password is kept"


def test_without_a_cool_off_the_page_says_to_ask_an_operator(alice, settings):
    settings.AXES_COOLOFF_TIME = None
    lock_out(settings.AXES_FAILURE_LIMIT)
    response = sign_in(Client(), "alice", ALICE_PASSWORD)
    assert response.status_code == 429
    assert "until an operator unlocks it" in response.content.decode()
    assert not response.has_header("Retry-After")


def test_failures_from_many_addresses_lock_the_user_name(alice, django_user_model, settings):
    django_user_model.objects.create_user("bob", password="bob-password-77")
    for n in range(settings.AXES_FAILURE_LIMIT - 1):
        fail(1, address=f"198.51.100.{n + 1}")
    assert sign_in(Client(), "alice", "wrong-guess", address="198.51.100.99").status_code == 429
    assert sign_in(Client(), "alice", ALICE_PASSWORD, address="203.0.113.9").status_code == 429
    bob_client = Client()
    assert sign_in(bob_client, "bob", "bob-password-77", address="203.0.113.9").status_code == 302, "others may"
    assert signed_in(bob_client)


def test_failures_over_many_user_names_lock_the_address(alice, settings):
    for n in range(settings.AXES_FAILURE_LIMIT - 1):
        fail(1, username=f"guess{n}", address="198.51.100.66")
    assert sign_in(Client(), "guess", "wrong-guess", address="198.51.100.66").status_code == 429
    assert sign_in(Client(), "alice", ALICE_PASSWORD, address="198.51.100.66").status_code == 429
    elsewhere = Client()
    assert sign_in(elsewhere, "alice", ALICE_PASSWORD, address="203.0.113.9").status_code == 302, "alice elsewhere may"
    assert signed_in(elsewhere)


@pytest.mark.parametrize("page", [ADMIN_LOGIN, "/api-auth/login/"], ids=["admin", "browsable API"])
def test_the_other_login_pages_lock_out_likewise(django_user_model, settings, page):
    django_user_model.objects.create_superuser("olga", password="operator-pass-1")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert sign_in(Client(), "olga", "wrong-guess", page=page).status_code == 200
    assert sign_in(Client(), "olga", "wrong-guess", page=page).status_code == 429
    client = Client()
    response = sign_in(client, "olga", "operator-pass-1", page=page)
    assert response.status_code == 429 and "Sign-in paused" in response.content.decode()
    assert client.get("/admin/").status_code == 302, "not signed in"


def test_the_api_token_endpoint_refuses_a_locked_out_user(alice, settings):
    """authenticate(request=...) from DRF works with the lock-out; a locked-out user gets no token."""
    anonymous = APIClient()
    answer = anonymous.post("/api/auth/token", {"username": "alice", "password": ALICE_PASSWORD})
    assert answer.status_code == 200 and answer.json()["token"]
    lock_out(settings.AXES_FAILURE_LIMIT)
    answer = anonymous.post("/api/auth/token", {"username": "alice", "password": ALICE_PASSWORD})
    assert answer.status_code == 429 and "token" not in answer.json()
    assert "Too many failed sign-ins" in answer.json()["detail"]
    assert int(answer["Retry-After"]) == settings.STOCKROOM_LOGIN_COOLOFF


def test_an_overlong_user_name_is_counted_not_a_server_error(settings):
    """Neither the API's token serializer nor the sign-in form stops a 5,000-character user name
    before the check; axes' table holds 255 characters (and PostgreSQL enforces that)."""
    long_name = "a" * 5000
    assert APIClient().post("/api/auth/token", {"username": long_name, "password": "x"}).status_code == 400
    fail(settings.AXES_FAILURE_LIMIT - 2, long_name)
    assert sign_in(Client(), long_name, "x").status_code == 429, "API and pages count together"
    assert AccessAttempt.objects.get().username == "a" * 255


def test_a_password_check_without_the_request_is_an_error(alice):
    """So that no path can check passwords beside the lock-out: whoever calls authenticate() passes the request."""
    with pytest.raises(AxesBackendRequestParameterRequired):
        authenticate(username="alice", password=ALICE_PASSWORD)
    assert authenticate(RequestFactory().post(SIGN_IN), username="alice", password=ALICE_PASSWORD) == alice


def test_an_operator_unlocks_in_the_admin(alice, django_user_model, settings):
    lock_out(settings.AXES_FAILURE_LIMIT)
    assert sign_in(Client(), "alice", ALICE_PASSWORD).status_code == 429
    locked = list(AccessAttempt.objects.filter(username="alice").values_list("pk", flat=True))

    viewer = client_of(staff(django_user_model, "vera", "view_accessattempt"))
    assert "unlock" not in viewer.get("/admin/axes/accessattempt/").content.decode()
    viewer.post("/admin/axes/accessattempt/", {"action": "unlock", "_selected_action": locked})
    assert sign_in(Client(), "alice", ALICE_PASSWORD).status_code == 429, "a view-only operator cannot unlock"

    operator = client_of(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    page = operator.get("/admin/axes/accessattempt/?locked_out=yes").content.decode()
    assert "alice" in page and "Locked Out" in page
    done = operator.post("/admin/axes/accessattempt/", {"action": "unlock", "_selected_action": locked}, follow=True)
    assert "Removed 1 record(s) of failed sign-ins: user names alice" in done.content.decode()
    client = Client()
    assert sign_in(client, "alice", ALICE_PASSWORD).status_code == 302
    assert signed_in(client)


def test_the_address_is_the_peers_and_behind_the_proxy_the_one_it_adds(alice, settings):
    spoofed = {"HTTP_X_FORWARDED_FOR": "192.0.2.1"}
    Client().post(SIGN_IN, {"username": "alice", "password": "x"}, REMOTE_ADDR="198.51.100.5", **spoofed)
    assert AccessAttempt.objects.get().ip_address == "198.51.100.5", "without a proxy, the header is the client's word"

    AccessAttempt.objects.all().delete()
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}  # STOCKROOM_TRUSTED_PROXIES=1
    forwarded = {"HTTP_X_FORWARDED_FOR": "192.0.2.1, 203.0.113.50"}
    Client().post(SIGN_IN, {"username": "alice", "password": "x"}, REMOTE_ADDR="127.0.0.1", **forwarded)
    assert AccessAttempt.objects.get().ip_address == "203.0.113.50"

    AccessAttempt.objects.all().delete()
    junk = {"HTTP_X_FORWARDED_FOR": "not-an-address"}
    Client().post(SIGN_IN, {"username": "alice", "password": "x"}, REMOTE_ADDR="127.0.0.1", **junk)
    assert AccessAttempt.objects.get().ip_address == "127.0.0.1"


# Admin actions check permissions --------------------------------------------------------------

DESTRUCTIVE = ("delete_instances", "stop_instances", "restart_instances", "start_instances")


@pytest.fixture
def running(create, alice) -> Instance:
    return Instance.objects.get(pk=create("redis")["id"])


def test_a_view_only_operator_is_offered_no_action_on_any_admin_page(django_user_model):
    viewer = staff(django_user_model, "vera", *Permission.objects.filter(codename__startswith="view_").values_list(
        "codename", flat=True))  # fmt: skip
    request = RequestFactory().get("/admin/")
    request.user = viewer
    offered = {
        model._meta.label: sorted(model_admin.get_actions(request))
        for model, model_admin in admin.site._registry.items()
        if model_admin.get_actions(request)
    }
    assert offered == {}


def test_a_view_only_operator_sees_no_destructive_action(django_user_model, running):
    viewer = client_of(staff(django_user_model, "vera", "view_instance"))
    page = viewer.get("/admin/provisioning/instance/")
    assert page.status_code == 200 and running.name in page.content.decode()
    for action in DESTRUCTIVE:
        assert f'value="{action}"' not in page.content.decode()


@pytest.mark.parametrize("action", DESTRUCTIVE)
def test_a_forged_action_post_from_a_view_only_operator_does_nothing(django_user_model, running, fake, action):
    if action == "start_instances":
        Instance.objects.filter(pk=running.pk).update(status=Status.STOPPED)
    before = Instance.objects.get(pk=running.pk).status
    calls = list(fake.calls)
    viewer = client_of(staff(django_user_model, "vera", "view_instance"))
    for form in ({"action": action, "_selected_action": [running.pk]},
                 {"action": action, "_selected_action": [running.pk], "index": "0"}):  # fmt: skip
        assert viewer.post("/admin/provisioning/instance/", form).status_code in (200, 302)
    instance = Instance.objects.get(pk=running.pk)
    assert instance.status == before
    assert not instance.events.filter(reason__contains="vera").exists()
    assert fake.calls == calls, "the backend was asked for nothing"


def test_each_action_needs_its_own_permission(django_user_model, running):
    changer = client_of(staff(django_user_model, "carl", "view_instance", "change_instance"))
    page = changer.get("/admin/provisioning/instance/").content.decode()
    assert 'value="stop_instances"' in page and 'value="delete_instances"' not in page
    changer.post("/admin/provisioning/instance/", {"action": "delete_instances", "_selected_action": [running.pk]})
    assert Instance.objects.get(pk=running.pk).status == Status.RUNNING, "change is not delete"

    remover = client_of(staff(django_user_model, "dora", "view_instance", "delete_instance"))
    remover.post("/admin/provisioning/instance/", {"action": "delete_instances", "_selected_action": [running.pk]})
    instance = Instance.objects.get(pk=running.pk)
    assert instance.status in (Status.DELETING, Status.DELETED)
    assert instance.events.filter(reason="Deletion requested by dora.").exists()


# Responses that show a secret are not stored ---------------------------------------------------


def test_every_response_showing_a_secret_is_no_store(api, alice, running):
    web = client_of(alice)
    kind, pk = running.kind, running.pk
    responses = {
        "instance page": web.get(f"/instances/{pk}/"),
        "instance panel": web.get(f"/instances/{pk}/panel/"),
        "token page": web.get("/token/"),
        "API config": api.get(f"/api/storage/{kind}/instances/{pk}/config"),
        "API webhook create": api.post("/api/webhooks", {"url": "http://127.0.0.1:9/hook"}),
    }
    password = Instance.objects.get(pk=pk).password
    assert password in responses["instance page"].content.decode(), "the test looks at a page that shows it"
    assert password in responses["API config"].content.decode()
    assert "secret" in responses["API webhook create"].json()
    for what, response in responses.items():
        assert response.status_code in (200, 201), (what, response.status_code)
        assert "no-store" in response.get("Cache-Control", ""), what


# /healthz: the status to everyone, the details to staff ------------------------------------------


@pytest.fixture(params=[True, False], ids=["healthy", "down"])
def checks(request, monkeypatch) -> bool:
    def broken() -> str:
        raise health.CheckFailed("The broker at /run/secret/path is not reachable.")

    found = {"database": lambda: "sqlite answers."} | ({} if request.param else {"broker": broken})
    monkeypatch.setattr(health, "CHECKS", found)
    return request.param


def test_healthz_shows_anonymous_callers_the_status_only(checks):
    response = Client().get("/healthz")
    assert response.status_code == (200 if checks else 503), "load balancers still read the code"
    assert response.json() == {"status": "ok" if checks else "down"}
    assert "secret" not in response.content.decode()


def test_healthz_shows_staff_the_details(checks, django_user_model, alice):
    operator = django_user_model.objects.create_user("olga", password="operator-pass-1", is_staff=True)
    for who, client in (("session", client_of(operator)), ("token", client_for(operator))):
        response = client.get("/healthz")
        assert response.status_code == (200 if checks else 503), who
        assert set(response.json()["checks"]) == ({"database"} if checks else {"database", "broker"}), who
    bad_token = APIClient()
    bad_token.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    for who, client in (("a user who is not staff", client_for(alice)), ("a bad token", bad_token)):
        response = client.get("/healthz")
        assert response.status_code == (200 if checks else 503), who
        assert "checks" not in response.json(), who


@pytest.mark.parametrize("path", ["/api/usage", "/api/auth/tokens", "/api/storage/redis/instances", "/healthz"])
def test_a_token_that_is_not_text_is_refused_not_a_server_error(checks, path):
    response = Client().get(path, HTTP_AUTHORIZATION=b"Token \xe9\xe9".decode("latin-1"))
    if path == "/healthz":
        assert response.status_code == (200 if checks else 503) and "checks" not in response.json(), "not staff"
    else:
        assert response.status_code == 401 and response.json()["detail"] == "Invalid token."
