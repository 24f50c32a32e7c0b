"""Other users' instances and webhooks do not exist for charlie: every endpoint answers 404."""

import pytest
from rest_framework.test import APIClient

from provisioning.models import Instance, Status

pytestmark = pytest.mark.django_db

ACTIONS = ("stop", "start", "restart", "rotate-password")


def instance_endpoints(kind: str, pk: int) -> list[tuple[str, str]]:
    url = f"/api/storage/{kind}/instances/{pk}"
    return [
        ("get", url),
        ("delete", url),
        ("get", f"{url}/config"),
        ("get", f"{url}/events"),
        *[("post", f"{url}/{action}") for action in ACTIONS],
    ]


@pytest.mark.parametrize("status", ["running", "stopped"])  # between them, every action is allowed to alice
def test_an_outsider_gets_404_from_every_instance_endpoint(api, outsider, create, act, fake, committed, status):
    instance = create("mysql")
    if status == "stopped":
        act(instance, "stop")
    calls = list(fake.calls)
    with committed():  # had anything been queued, it would run here
        answers = {(method, url): getattr(outsider, method)(url).status_code
                   for method, url in instance_endpoints("mysql", instance["id"])}  # fmt: skip
    assert set(answers.values()) == {404}, answers
    assert outsider.get("/api/storage/mysql/instances").json()["count"] == 0
    assert Instance.objects.get(pk=instance["id"]).status == status
    assert fake.calls == calls, "the backend was asked for nothing"
    assert api.get(f"/api/storage/mysql/instances/{instance['id']}").status_code == 200, "alice still sees it"


def test_the_kind_in_the_path_must_match_for_every_endpoint(api, create):
    instance = create("redis")
    for method, url in instance_endpoints("mysql", instance["id"]):
        assert getattr(api, method)(url).status_code == 404, url
    assert Instance.objects.get(pk=instance["id"]).status == Status.RUNNING
    assert api.get("/api/storage/postgres/instances").status_code == 404, "no such kind"


def test_a_deleted_instance_is_gone_for_its_owner_too(api, create, act):
    instance = create("redis")
    act(instance, "delete")
    for method, url in instance_endpoints("redis", instance["id"]):
        assert getattr(api, method)(url).status_code == 404, url


def test_anonymous_gets_401_from_every_endpoint(create):
    instance = create("redis")
    anonymous = APIClient()
    endpoints = [("get", "/api/storage/redis/instances"), ("post", "/api/storage/redis/instances")]
    endpoints += instance_endpoints("redis", instance["id"]) + [("get", "/api/webhooks"), ("post", "/api/webhooks")]
    for method, url in endpoints:
        assert getattr(anonymous, method)(url).status_code == 401, url
    assert Instance.objects.count() == 1


def test_an_outsider_gets_404_from_every_webhook_endpoint(api, outsider):
    hook = api.post("/api/webhooks", {"url": "https://ci.example.com/hook"}).json()
    for method, url in [
        ("get", f"/api/webhooks/{hook['id']}"),
        ("delete", f"/api/webhooks/{hook['id']}"),
        ("get", f"/api/webhooks/{hook['id']}/deliveries"),
    ]:
        assert getattr(outsider, method)(url).status_code == 404, url
    assert outsider.get("/api/webhooks").json()["count"] == 0
    assert api.get(f"/api/webhooks/{hook['id']}").status_code == 200
