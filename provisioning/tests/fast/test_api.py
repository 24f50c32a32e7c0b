"""The API's contract without starting servers: validation, auth, quota, pagination.

These tests run inside a transaction that is rolled back: queued work runs only in `committed()`.
"""

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings
from rest_framework.test import APIClient

from provisioning.backends.base import BackendError
from provisioning.models import Instance, Status

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("kind", "body", "field", "hint"),
    [
        ("mysql", {"charset": "klingon"}, "charset", "utf8mb4, latin1"),
        ("mysql", {"charset": 7}, "charset", "utf8mb4"),
        ("mysql", {"binlog_format": "row"}, "binlog_format", "ROW, STATEMENT, MIXED"),
        ("mysql", {"charset": "latin1", "collation": "utf8mb4_bin"}, "collation", "latin1_swedish_ci"),
        ("mysql", {"collation": "no_such_collation"}, "collation", "utf8mb4_general_ci"),
        ("mysql", {"engine": "innodb"}, "engine", "charset, collation, binlog_format"),
        ("redis", {"maxmemory": "lots"}, "maxmemory", "256mb"),
        ("redis", {"maxmemory": -5}, "maxmemory", "1mb to 4gb"),
        ("redis", {"maxmemory": "9gb"}, "maxmemory", "1mb to 4gb"),
        ("redis", {"maxmemory": True}, "maxmemory", "integer"),
        ("redis", {"maxmemory": "1" * 5000 + "mb"}, "maxmemory", "256mb"),
        ("redis", {"maxmemory_policy": "lru"}, "maxmemory_policy", "allkeys-lru"),
        ("redis", {"maxclients": 0}, "maxclients", "1 to 10000"),
        ("redis", {"maxclients": 10001}, "maxclients", "1 to 10000"),
        ("redis", {"maxclients": "100"}, "maxclients", "not an integer"),
        ("redis", {"maxclients": 1.5}, "maxclients", "not an integer"),
        ("redis", {"appendfsync": "sometimes"}, "appendfsync", "always, everysec, no"),
        ("redis", {"password": "mine"}, "password", "maxmemory"),
        ("redis", {"name": "Bad Name!"}, "name", "lower-case letters"),
        ("redis", {"name": 12}, "name", "string"),
        ("redis", {"name": "cache\n"}, "name", "lower-case letters"),
    ],
)
def test_it_rejects_bad_input_naming_the_field(api, committed, fake, kind, body, field, hint):
    with committed() as queued:  # had anything been queued, the worker's side would run here
        response = api.post(f"/api/storage/{kind}/instances", body, format="json")
    assert response.status_code == 400, response.content
    assert hint in " ".join(response.json()[field])
    assert not Instance.objects.exists()
    assert queued == [] and fake.calls == [], "nothing was started"


@pytest.mark.parametrize("body", ['"just a string"', "[1, 2]", "{not json"])
def test_it_rejects_a_body_that_is_not_an_object(api, body):
    response = api.post("/api/storage/redis/instances", body, content_type="application/json")
    assert response.status_code == 400


def test_create_answers_202_with_the_reserved_port(api, alice):
    response = api.post("/api/storage/redis/instances", {"name": "cache", "maxmemory": "256mb"}, format="json")
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "provisioning"
    assert body["name"] == "cache"
    assert body["options"]["maxmemory"] == 256 * 1024 * 1024
    first, last = settings.STOCKROOM_PORT_RANGE
    assert first <= body["port"] <= last
    assert "password" not in body
    instance = Instance.objects.get()
    assert instance.owner == alice
    assert list(instance.events.values_list("to_status", flat=True)) == ["provisioning"]


def test_names_are_unique_per_owner_and_kind(api):
    assert api.post("/api/storage/redis/instances", {"name": "cache"}, format="json").status_code == 202
    response = api.post("/api/storage/redis/instances", {"name": "cache"}, format="json")
    assert response.status_code == 400
    assert "already" in response.json()["name"][0]
    assert api.post("/api/storage/mysql/instances", {"name": "cache"}, format="json").status_code == 202


def test_each_create_gets_its_own_port(api):
    ports = {api.post("/api/storage/redis/instances", {}, format="json").json()["port"] for _ in range(3)}
    assert len(ports) == 3


@override_settings(STOCKROOM_QUOTA=2)
def test_the_quota_holds(api, outsider):
    for _ in range(2):
        assert api.post("/api/storage/redis/instances", {}, format="json").status_code == 202
    response = api.post("/api/storage/mysql/instances", {}, format="json")
    assert response.status_code == 403
    assert "Quota reached" in response.json()["detail"]
    assert Instance.objects.count() == 2
    assert outsider.post("/api/storage/redis/instances", {}, format="json").status_code == 202


@override_settings(STOCKROOM_QUOTA=1)
def test_failed_and_deleted_instances_do_not_count(api, create, act, fake):
    fake.fail_next("create", BackendError("no room"))
    assert create("redis")["status"] == "failed"
    second = create("redis")
    assert second["status"] == "running", "a failed instance does not count"
    assert api.post("/api/storage/redis/instances", {}).status_code == 403, "a running one does"
    assert act(second, "delete")["status"] == "gone"
    assert Instance.objects.get(pk=second["id"]).status == Status.DELETED
    assert create("redis")["status"] == "running", "a deleted instance does not count"


def test_delete_while_provisioning_is_a_conflict(api):
    pk = api.post("/api/storage/redis/instances", {}, format="json").json()["id"]
    response = api.delete(f"/api/storage/redis/instances/{pk}")
    assert response.status_code == 409
    assert response.json()["status"] == "provisioning"


def test_config_shows_the_credentials_to_the_owner(api):
    pk = api.post("/api/storage/mysql/instances", {"charset": "latin1"}, format="json").json()["id"]
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    assert set(config) == {
        "host", "port", "database", "username", "password", "charset", "collation", "binlog_format", "tls",
        "ca_certificate", "uri",
    }  # fmt: skip
    assert config["tls"] == "off" and config["ca_certificate"] == ""
    assert len(config["password"]) >= 24 and config["password"].isalnum()
    assert config["collation"] == "latin1_swedish_ci"
    assert config["uri"] == (
        f"mysql://{config['username']}:{config['password']}@{config['host']}:{config['port']}/{config['database']}"
    )


def test_passwords_are_encrypted_in_the_database(api):
    pk = api.post("/api/storage/redis/instances", {}, format="json").json()["id"]
    password = api.get(f"/api/storage/redis/instances/{pk}/config").json()["password"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT password, admin_password FROM provisioning_instance WHERE id = %s", [pk])
        stored, stored_admin = cursor.fetchone()
    assert password not in stored
    assert stored.startswith("gAAAA")  # a Fernet token
    assert stored_admin.startswith("gAAAA")


def test_list_is_paginated_and_trailing_slashes_are_optional(api):
    for _ in range(3):
        api.post("/api/storage/redis/instances/", {}, format="json")
    page = api.get("/api/storage/redis/instances?page_size=2").json()
    assert page["count"] == 3
    assert len(page["results"]) == 2
    assert page["next"] and page["previous"] is None
    assert len(api.get("/api/storage/redis/instances/?page=2&page_size=2").json()["results"]) == 1


@pytest.mark.parametrize("instances", [0, 1, 2, 3])
def test_the_first_page_counts_right_whether_it_is_full_or_not(api, instances):
    """The first page is loaded without a count when it is not full: at, below and past a full page
    the count and the links are the same as they would be with one."""
    for _ in range(instances):
        api.post("/api/storage/redis/instances", {}, format="json")
    page = api.get("/api/storage/redis/instances?page_size=2").json()
    assert page["count"] == instances
    assert len(page["results"]) == min(instances, 2)
    assert bool(page["next"]) == (instances > 2)
    assert api.get("/api/storage/redis/instances?page=1&page_size=2").json() == page


def test_a_token_is_issued_for_a_username_and_password(alice):
    client = APIClient()
    response = client.post("/api/auth/token", {"username": "alice", "password": "correct-horse-battery"})
    assert response.status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert client.get("/api/storage/mysql/instances").status_code == 200
    wrong = APIClient().post("/api/auth/token", {"username": "alice", "password": "nope"})
    assert wrong.status_code == 400


def test_session_login_works_too(client, alice):
    client.force_login(alice)
    assert client.get("/api/storage/redis/instances").status_code == 200


def test_schema_and_docs_are_served(client):
    assert client.get("/api/schema").status_code == 200
    assert client.get("/api/docs").status_code == 200


def test_a_failed_instance_has_no_connection(api, create, fake):
    fake.fail_next("create", BackendError("broken"))
    pk = create("redis")["id"]
    assert api.get(f"/api/storage/redis/instances/{pk}").json()["port"] is None
    response = api.get(f"/api/storage/redis/instances/{pk}/config")
    assert response.status_code == 409
    assert response.json()["status"] == "failed"


@pytest.mark.parametrize("page_size", [5, 50])
def test_a_list_page_costs_the_same_queries_whatever_its_size(api, alice, django_assert_num_queries, page_size):
    Instance.objects.bulk_create(
        Instance(
            owner=alice,
            kind="redis",
            name=f"r{i}",
            status=Status.RUNNING,
            host="127.0.0.1",
            port=40000 + i,
            username="default",
            password="x",
            admin_password="x",
        )  # fmt: skip
        for i in range(60)
    )
    api.get("/api/storage/redis/instances")  # the token's first use this minute writes last_used (one UPDATE)
    with django_assert_num_queries(3):  # the token, the first page's rows, the count (the page is full)
        response = api.get(f"/api/storage/redis/instances?page_size={page_size}")
    assert len(response.json()["results"]) == page_size
    with django_assert_num_queries(4):  # the token, the count, the page's ids, its rows
        response = api.get(f"/api/storage/redis/instances?page_size={page_size}&page=2")
    assert len(response.json()["results"]) == min(page_size, 60 - page_size)


def test_webhook_deliveries_cost_the_same_queries_whatever_their_number(api, django_assert_num_queries):
    hook = api.post("/api/webhooks", {"url": "https://ci.example.com/hook"}).json()
    for _ in range(3):
        api.post("/api/storage/redis/instances", {})  # one delivery each: its "provisioning" event
    with django_assert_num_queries(4):  # the token, the webhook, the count, the page
        response = api.get(f"/api/webhooks/{hook['id']}/deliveries")
    assert response.json()["count"] == 3
