"""API tokens: stored hashed, named, expiring, several per user, revocable at once; the token
endpoints throttle guessers. Each attack of issue 12 on tokens is replayed here as a client would.

alice owns tokens, charlie is an outsider, olga is an operator.
"""

import hashlib
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import Permission
from django.core.cache import caches
from django.db import connection
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from provisioning.api.authentication import TokenAuthentication
from provisioning.models import AccessToken

pytestmark = pytest.mark.django_db

TOKENS = "/api/auth/tokens"
LIST = "/api/storage/redis/instances"


@pytest.fixture(autouse=True)
def fresh_throttles():
    caches["shared"].clear()
    yield
    caches["shared"].clear()


def with_token(secret: str, **extra) -> APIClient:
    client = APIClient(**extra)
    client.credentials(HTTP_AUTHORIZATION=f"Token {secret}")
    return client


def new_token(api: APIClient, name: str = "ci", **body) -> dict:
    response = api.post(TOKENS, {"name": name, **body})
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture
def olga(django_user_model):
    return django_user_model.objects.create_superuser("olga", password="operator-pass-1")


# Stored hashed ----------------------------------------------------------------------------------


def test_a_tokens_secret_is_not_stored(api):
    secret = new_token(api)["token"]
    with connection.cursor() as cursor:  # the row as someone who can read the database sees it
        cursor.execute("SELECT * FROM provisioning_accesstoken")
        rows = cursor.fetchall()
    stored = " ".join(str(value) for row in rows for value in row)
    assert secret not in stored
    assert secret[15:] not in stored  # the first 15 characters find the row; the rest is only hashed
    assert hashlib.sha512(secret.encode()).hexdigest() in stored
    assert with_token(secret).get(LIST).status_code == 200


def test_the_list_never_shows_a_secret_or_a_digest(api):
    created = new_token(api)
    listed = api.get(TOKENS).json()["results"]
    assert {token["name"] for token in listed} == {"ci", "tests"}
    for token in listed:
        assert set(token) == {"id", "name", "created", "expires", "expired", "last_used"}
    assert created["token"] not in str(listed)


# Expiry -----------------------------------------------------------------------------------------


def test_an_expired_token_is_refused(api):
    secret = new_token(api, expires_in="1s")["token"]
    assert with_token(secret).get(LIST).status_code == 200
    time.sleep(1.2)
    response = with_token(secret).get(LIST)
    assert response.status_code == 401
    assert [token["expired"] for token in api.get(TOKENS).json()["results"] if token["name"] == "ci"] == [True]


def test_a_new_token_clears_the_owners_expired_ones(api):
    old = new_token(api, "old", expires_in="1h")
    AccessToken.objects.filter(pk=old["id"]).update(expiry=timezone.now() - timedelta(seconds=1))
    new_token(api, "new")
    assert sorted(AccessToken.objects.values_list("name", flat=True)) == ["new", "tests"]


def test_tokens_expire_after_the_default_lifetime(api, settings):
    settings.STOCKROOM_TOKEN_TTL = timedelta(days=7)
    expires = AccessToken.objects.get(pk=new_token(api)["id"]).expiry
    assert abs(expires - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)


def test_never_is_refused_unless_the_operator_allows_it(api, settings):
    settings.STOCKROOM_TOKEN_ALLOW_NEVER = False
    response = api.post(TOKENS, {"name": "ci", "expires_in": "never"})
    assert response.status_code == 400
    assert "not allowed" in response.json()["expires_in"][0]
    settings.STOCKROOM_TOKEN_ALLOW_NEVER = True
    token = new_token(api, expires_in="never")
    assert token["expires"] is None
    assert with_token(token["token"]).get(LIST).status_code == 200


def test_no_token_outlives_the_operators_maximum_unless_never_is_allowed(api, settings):
    """Else "never" is refused but ten years is not: a stolen token could mint such tokens, and
    they would outlive its revocation."""
    settings.STOCKROOM_TOKEN_ALLOW_NEVER = False
    settings.STOCKROOM_TOKEN_MAX_TTL = timedelta(days=365)
    response = api.post(TOKENS, {"name": "long", "expires_in": "3650d"})
    assert response.status_code == 400 and "at most 365d" in response.json()["expires_in"][0]
    assert new_token(api, expires_in="365d")["expires"]
    settings.STOCKROOM_TOKEN_ALLOW_NEVER = True  # an operator who allows never allows any lifetime
    assert new_token(api, expires_in="3650d")["expires"]


@pytest.mark.parametrize(("expires_in", "days"), [("30", 30), (30, 30), ("2w", 14), ("12h", 0.5), (None, 90), ("", 90)])
def test_expires_in_takes_days_or_a_duration(api, expires_in, days):
    token = new_token(api, format="json", expires_in=expires_in)
    expected = timezone.now() + timedelta(days=days)
    assert abs(AccessToken.objects.get(pk=token["id"]).expiry - expected) < timedelta(minutes=1)


@pytest.mark.parametrize("expires_in", ["soon", "0", "-5", "3651d", "1.5", True, [30], {"days": 1}])
def test_a_bad_expiry_is_a_clear_400(api, expires_in):
    response = api.post(TOKENS, {"name": "ci", "expires_in": expires_in}, format="json")
    assert response.status_code == 400, response.content
    assert "expires_in" in response.json()
    assert AccessToken.objects.filter(name="ci").count() == 0


@pytest.mark.parametrize("body", [{}, {"name": ""}, {"name": "   "}, {"name": "x" * 101}, {"name": 5}])
def test_a_token_needs_a_name(api, body):
    response = api.post(TOKENS, body, format="json")
    assert response.status_code == 400
    assert "name" in response.json()


# Several per user, revoked at once ---------------------------------------------------------------


def test_a_user_holds_several_tokens_and_each_works(api):
    secrets = [new_token(api, name)["token"] for name in ("ci", "laptop", "deploy")]
    assert len(set(secrets)) == 3
    for secret in secrets:
        assert with_token(secret).get(LIST).status_code == 200
    assert api.get(TOKENS).json()["count"] == 4  # and the one the client was made with


def test_a_revoked_token_is_refused_at_once(api):
    token = new_token(api)
    client = with_token(token["token"])
    assert client.get(LIST).status_code == 200
    assert api.delete(f"{TOKENS}/{token['id']}").status_code == 204
    assert client.get(LIST).status_code == 401
    assert api.get(LIST).status_code == 200  # the others keep working


def test_another_users_token_is_404(api, outsider):
    token = new_token(api)
    assert outsider.delete(f"{TOKENS}/{token['id']}").status_code == 404
    assert token["id"] not in [t["id"] for t in outsider.get(TOKENS).json()["results"]]
    assert with_token(token["token"]).get(LIST).status_code == 200


def test_token_endpoints_need_a_login():
    assert APIClient().get(TOKENS).status_code == 401
    assert APIClient().post(TOKENS, {"name": "x"}).status_code == 401


def test_the_answer_showing_a_secret_is_not_cached(api, alice):
    assert "no-store" in api.post(TOKENS, {"name": "ci"})["Cache-Control"]
    login = APIClient().post("/api/auth/token", {"username": "alice", "password": "correct-horse-battery"})
    assert "no-store" in login["Cache-Control"]


# The compatibility endpoint --------------------------------------------------------------------


def test_the_token_endpoint_issues_a_new_named_token_each_call(alice):
    answers = [
        APIClient().post("/api/auth/token", {"username": "alice", "password": "correct-horse-battery"})
        for _ in range(2)
    ]
    assert [answer.status_code for answer in answers] == [200, 200]
    first, second = (answer.json()["token"] for answer in answers)
    assert first != second
    for secret in (first, second):
        assert with_token(secret).get(LIST).status_code == 200
    assert list(AccessToken.objects.values_list("name", flat=True)) == ["api-token", "api-token"]


def test_an_inactive_users_token_is_refused(api, alice):
    alice.is_active = False
    alice.save()
    assert api.get(LIST).status_code == 401


# Throttling ------------------------------------------------------------------------------------


def guess(password: str, username: str = "alice", address: str = "203.0.113.7", **headers):
    return APIClient(REMOTE_ADDR=address).post(
        "/api/auth/token", {"username": username, "password": password}, **headers
    )


def test_sixty_wrong_passwords_then_the_right_one_get_429(alice):
    answers = [guess(f"wrong-{n}").status_code for n in range(60)]
    # The tenth failure locks the address and the user name out (the sign-in lock-out); the
    # throttle would have stopped the eleventh anyway.
    assert answers[:9] == [400] * 9
    assert set(answers[9:]) == {429}
    right = guess("correct-horse-battery")
    assert right.status_code == 429
    assert 0 < int(right["Retry-After"]) <= 60
    assert "token" not in right.json()


def test_guessing_from_many_addresses_is_throttled_by_user_name(alice):
    # A spoofed X-Forwarded-For changes nothing either (no trusted proxy by default).
    for n in range(10):
        guess(f"wrong-{n}", address=f"198.51.100.{n}", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")
    assert guess("correct-horse-battery", address="198.51.100.200").status_code == 429


def test_a_refused_attempt_writes_no_count_so_a_flood_cannot_cull_the_live_ones(alice):
    """The shared cache culls entries past its size: if refused requests still wrote a count per
    new user name, one address could flood it until the counts that hold it back were dropped."""

    def counts() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM stockroom_cache")
            return cursor.fetchone()[0]

    for n in range(10):
        guess("password", username=f"user-{n}")
    before = counts()
    assert [guess("password", username=f"flood-{n}").status_code for n in range(50)] == [429] * 50
    assert counts() == before


def test_guessing_many_user_names_from_one_address_is_throttled(alice):
    for n in range(10):
        guess("password", username=f"user-{n}", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}")
    assert guess("correct-horse-battery").status_code == 429
    assert guess("correct-horse-battery", address="203.0.113.8").status_code == 200  # others are not held up


def test_behind_a_trusted_proxy_the_forwarded_address_counts(alice, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}  # STOCKROOM_TRUSTED_PROXIES=1
    for n in range(10):  # ten clients behind one proxy, each with a name of its own
        assert guess("password", username=f"user-{n}", HTTP_X_FORWARDED_FOR=f"192.0.2.{n}").status_code == 400
    assert guess("password", username="user-0", HTTP_X_FORWARDED_FOR="192.0.2.0").status_code == 400
    for n in range(10):
        guess("password", username=f"other-{n}", HTTP_X_FORWARDED_FOR="192.0.2.99")
    assert guess("correct-horse-battery", HTTP_X_FORWARDED_FOR="192.0.2.99").status_code == 429


def test_the_rates_are_settings(alice, settings):
    settings.STOCKROOM_TOKEN_RATE_ADDRESS = settings.STOCKROOM_TOKEN_RATE_USERNAME = "2/hour"
    assert [guess("wrong").status_code for _ in range(3)] == [400, 400, 429]
    assert int(guess("correct-horse-battery")["Retry-After"]) > 60


def test_creating_tokens_is_throttled_per_user_listing_is_not(api, outsider, settings):
    settings.STOCKROOM_TOKEN_RATE_CREATE = "2/hour"
    assert [api.post(TOKENS, {"name": f"t{n}"}).status_code for n in range(3)] == [201, 201, 429]
    assert api.get(TOKENS).status_code == 200
    assert outsider.post(TOKENS, {"name": "mine"}).status_code == 201


def test_the_token_page_counts_against_the_same_limit(api, alice, client, settings):
    settings.STOCKROOM_TOKEN_RATE_CREATE = "2/hour"
    client.force_login(alice)
    assert api.post(TOKENS, {"name": "by-api"}).status_code == 201
    assert client.post("/token/", {"name": "by-page", "expires_in": "30d"}).status_code == 200
    refused = client.post("/token/", {"name": "one-too-many", "expires_in": "30d"})
    assert refused.status_code == 429 and "Too many new tokens" in refused.content.decode()
    assert api.post(TOKENS, {"name": "by-api-again"}).status_code == 429
    names = {token["name"] for token in api.get(TOKENS).json()["results"]}
    assert "one-too-many" not in names and "by-page" in names


def test_throttles_count_in_the_cache_every_worker_shares(alice, settings):
    """Another gunicorn worker is another process with its own memory: counts must be in the database."""
    assert settings.CACHES["shared"]["BACKEND"] == "django.core.cache.backends.db.DatabaseCache"
    for n in range(10):
        guess(f"wrong-{n}")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT COUNT(*) FROM {settings.CACHES['shared']['LOCATION']}")
        assert cursor.fetchone()[0] >= 2  # one entry per address, one per user name


# Last used -------------------------------------------------------------------------------------


def test_last_used_is_written_at_most_once_a_minute(api, monkeypatch, django_assert_num_queries):
    token = new_token(api)
    client = with_token(token["token"])
    start = timezone.now()
    monkeypatch.setattr(TokenAuthentication, "clock", staticmethod(lambda: start))
    with django_assert_num_queries(4):  # the token, its last-used UPDATE, the list's count and page
        client.get(TOKENS)
    assert AccessToken.objects.get(pk=token["id"]).last_used == start
    monkeypatch.setattr(TokenAuthentication, "clock", staticmethod(lambda: start + timedelta(seconds=59)))
    for _ in range(3):
        with django_assert_num_queries(3):  # no write within the minute
            client.get(TOKENS)
    assert AccessToken.objects.get(pk=token["id"]).last_used == start
    later = start + timedelta(seconds=61)
    monkeypatch.setattr(TokenAuthentication, "clock", staticmethod(lambda: later))
    client.get(LIST)
    assert AccessToken.objects.get(pk=token["id"]).last_used == later
    listed = {t["id"]: t for t in api.get(TOKENS).json()["results"]}
    assert listed[token["id"]]["last_used"] is not None


# The token page --------------------------------------------------------------------------------


@pytest.fixture
def web(alice) -> Client:
    client = Client()
    client.force_login(alice)
    return client


def test_the_page_lists_creates_and_revokes_tokens(web, alice):
    response = web.post("/token/", {"name": "laptop", "expires_in": "30d"})
    assert response.status_code == 200
    secret = response.context["new"].secret
    assert with_token(secret).get(LIST).status_code == 200
    with_token(secret).get(LIST)
    page = web.get("/token/").content.decode()
    assert "laptop" in page and secret not in page and "ago" in page  # last used
    token = AccessToken.objects.get(name="laptop")
    assert web.post(f"/token/{token.pk}/revoke/").status_code == 302
    assert with_token(secret).get(LIST).status_code == 401
    after = web.get("/token/")
    assert "was revoked" in after.content.decode() and list(after.context["tokens"]) == []


def test_the_page_shows_errors_at_their_field(web, settings):
    settings.STOCKROOM_TOKEN_ALLOW_NEVER = False
    response = web.post("/token/", {"name": "ci", "expires_in": "never"})
    assert response.status_code == 200
    assert 'id="expires_in-error"' in response.content.decode()
    assert not AccessToken.objects.exists()
    assert 'id="name-error"' in web.post("/token/", {"name": "", "expires_in": "30"}).content.decode()


def test_an_outsider_cannot_revoke_on_the_page(web, charlie, alice):
    token, _ = AccessToken.objects.create(alice, name="mine")
    outsider = Client()
    outsider.force_login(charlie)
    assert outsider.post(f"/token/{token.pk}/revoke/").status_code == 404
    assert AccessToken.objects.filter(pk=token.pk).exists()


def test_the_page_is_protected_against_csrf(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.post("/token/", {"name": "ci"}).status_code == 403
    assert not AccessToken.objects.exists()


# The admin -------------------------------------------------------------------------------------


def test_operators_see_and_revoke_tokens_in_the_admin(api, olga):
    token = new_token(api, "ci")
    stored = AccessToken.objects.get(pk=token["id"])
    admin = Client()
    admin.force_login(olga)
    listing = admin.get("/admin/provisioning/accesstoken/").content.decode()
    detail = admin.get(f"/admin/provisioning/accesstoken/{token['id']}/change/").content.decode()
    for page in (listing, detail):
        assert "ci" in page
        assert stored.digest not in page and stored.token_key not in page and token["token"] not in page
    for field in ("digest", "token_key", "name", "expiry"):  # nothing to edit, least of all the digest
        assert f'name="{field}"' not in detail
    response = admin.post(
        "/admin/provisioning/accesstoken/", {"action": "revoke_tokens", "_selected_action": [token["id"]]}
    )
    assert response.status_code == 302
    assert with_token(token["token"]).get(LIST).status_code == 401


def test_a_view_only_operator_cannot_revoke(api, django_user_model):
    token = new_token(api)
    viewer = django_user_model.objects.create_user("vera", password="viewer-pass-1", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_accesstoken"))
    admin = Client()
    admin.force_login(viewer)
    assert "revoke_tokens" not in admin.get("/admin/provisioning/accesstoken/").content.decode()
    admin.post("/admin/provisioning/accesstoken/", {"action": "revoke_tokens", "_selected_action": [token["id"]]})
    assert admin.post(f"/admin/provisioning/accesstoken/{token['id']}/delete/", {"post": "yes"}).status_code == 403
    assert with_token(token["token"]).get(LIST).status_code == 200


# DRF's plaintext tokens ------------------------------------------------------------------------


def test_an_old_drf_token_keeps_working_hashed_and_its_plaintext_is_gone(alice, settings):
    """What migration 0007 does to a portal that had DRF's authtoken table."""
    from importlib import import_module

    from django.apps import apps

    migration = import_module("provisioning.migrations.0007_access_tokens")
    old = "9944b09199c62bcf9418ad846dd0e4bbdfc6ee4b"  # 40 hex characters, as DRF made them
    with connection.cursor() as cursor:
        cursor.execute(
            'CREATE TABLE authtoken_token ("key" varchar(40) PRIMARY KEY, created timestamp, user_id integer)'
        )
        cursor.execute(
            'INSERT INTO authtoken_token ("key", created, user_id) VALUES (%s, %s, %s)', [old, timezone.now(), alice.pk]
        )
    migration.hash_old_tokens(apps, SimpleNamespace(connection=connection))
    with connection.cursor() as cursor:
        cursor.execute("SELECT COUNT(*) FROM authtoken_token")
        assert cursor.fetchone()[0] == 0
        cursor.execute("SELECT * FROM provisioning_accesstoken")
        assert old not in str(cursor.fetchall())
    assert with_token(old).get(LIST).status_code == 200
    moved = AccessToken.objects.get(user=alice)
    assert moved.name == migration.MOVED_NAME
    assert abs(moved.expiry - (timezone.now() + settings.STOCKROOM_TOKEN_TTL)) < timedelta(minutes=1)
