"""A request costs the same SQL queries whatever the number of rows: a user's list and config with
one instance or ten, the admin's instance list over a few rows or many, of one owner or of many.

Counted, not timed: how long they take at 100,000 rows is the benchmark's business (section 4).
"""

from itertools import count

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from provisioning.models import Instance, Status

ports = count(40000)


def make(owner, number: int, *, kind: str = "redis", status: str = Status.RUNNING) -> list[Instance]:
    """`number` rows of `owner`, in bulk (never provisioned: these tests only read them)."""
    rows = [
        Instance(
            owner=owner,
            kind=kind,
            name=f"{kind}-{status}-{next(ports)}",
            status=status,
            backend="fake",
            host="127.0.0.1",
            port=next(ports),
            username="default",
            password="x",
            admin_password="x",
            server_version="7.0.0",
        )
        for _ in range(number)
    ]
    return Instance.objects.bulk_create(rows)


def queries(client, path: str) -> int:
    client.get(path)  # a token's first use this minute writes last_used: not what is counted
    with CaptureQueriesContext(connection) as captured:
        response = client.get(path)
    assert response.status_code == 200, response.content[:500]
    return len(captured)


def test_a_users_list_and_config_cost_the_same_with_one_instance_or_ten(api, outsider, alice, charlie):
    make(alice, 1)
    make(alice, 30, status=Status.DELETED)  # deleted rows are never read, let alone one by one
    make(charlie, 10)
    make(charlie, 5, kind="mysql")
    one = Instance.objects.filter(owner=alice, status=Status.RUNNING).first()
    ten = Instance.objects.filter(owner=charlie, kind="redis").first()
    lists = queries(api, "/api/storage/redis/instances"), queries(outsider, "/api/storage/redis/instances")
    assert lists[0] == lists[1]
    assert len(outsider.get("/api/storage/redis/instances").json()["results"]) == 10
    configs = (
        queries(api, f"/api/storage/redis/instances/{one.pk}/config"),
        queries(outsider, f"/api/storage/redis/instances/{ten.pk}/config"),
    )
    assert configs[0] == configs[1]


@pytest.fixture
def operator(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    return client


@pytest.mark.parametrize(
    "query",
    ["", "?status__exact=running", "?kind__exact=redis", "?backend__exact=fake", "?upgrade=yes", "?q=redis"],
)
def test_the_admin_instance_list_costs_the_same_at_few_rows_and_many(operator, django_user_model, query):
    path = f"/admin/provisioning/instance/{query}"
    owners = [django_user_model.objects.create_user(f"user{n}") for n in range(3)]
    make(owners[0], 2)
    few = queries(operator, path)
    for owner in owners:  # many rows of many owners: more than a page, most of them deleted
        make(owner, 10)
        make(owner, 40, status=Status.DELETED)
        make(owner, 5, kind="mysql")
    assert queries(operator, path) == few


def test_the_admin_filters_need_no_query_for_their_choices(operator, alice):
    """Kind and backend are offered from the registry and the settings (Django's own filter would
    read every row for them), and an owner's link filters the list to their instances."""
    make(alice, 2)
    page = operator.get("/admin/provisioning/instance/").content.decode()
    assert "?kind__exact=mysql" in page  # offered though no row is a MySQL
    assert "?backend__exact=local" in page
    assert f"?owner__id__exact={alice.pk}" in page
    listed = operator.get(f"/admin/provisioning/instance/?owner__id__exact={alice.pk}&kind__exact=redis")
    assert listed.status_code == 200
    assert listed.context["cl"].result_count == 2


def test_the_admin_list_decrypts_no_secret_and_its_checkboxes_still_select(operator, alice, monkeypatch):
    """The list shows no password, so it reads none (a decryption per row per secret, at 25 rows a
    page); the checkbox it writes itself is the one Django's actions read."""
    from provisioning import crypto

    [instance] = make(alice, 1)
    decrypted = []
    real = crypto.decrypt
    monkeypatch.setattr(crypto, "decrypt", lambda *args, **kwargs: decrypted.append(1) or real(*args, **kwargs))
    page = operator.get("/admin/provisioning/instance/").content.decode()
    assert decrypted == []
    assert f'<input type="checkbox" name="_selected_action" value="{instance.pk}" class="action-select"' in page
    operator.post("/admin/provisioning/instance/", {"action": "protect_instances", "_selected_action": [instance.pk]})
    instance.refresh_from_db()
    assert instance.protected
