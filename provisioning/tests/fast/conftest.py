"""The fast tier: logic over the in-memory fake backend. No server, no broker, no worker process.

Tests drive the portal the way users and the worker do: the HTTP API, Celery tasks (inline in
tests), Reconciler().run_once(), and the models' fields. Work queued after commit runs only inside
`committed()`, since these tests run in a transaction that is rolled back.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import timedelta
from functools import partial

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from provisioning.backends.base import get_backend
from provisioning.backends.fake import FakeBackend, FakeFleetBackend
from provisioning.reconciler import Reconciler


@pytest.fixture(autouse=True)
def fake(settings) -> FakeBackend:
    """Every instance a test creates lives in this backend, empty at the start of each test."""
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "fake": {"BACKEND": "provisioning.backends.fake.FakeBackend"},
    }
    settings.STOCKROOM_DEFAULT_BACKEND = "fake"
    backend = get_backend("fake")
    backend.reset()
    return backend


@pytest.fixture
def committed(django_capture_on_commit_callbacks) -> Callable[[], AbstractContextManager]:
    """`with committed(): ...` runs, at the end of the block, what would run once the request's
    transaction commits: the queued tasks, which run inline in tests, as a worker would run them."""
    return partial(django_capture_on_commit_callbacks, execute=True)


@pytest.fixture
def create(api, committed) -> Callable[..., dict]:
    """create(kind, **options) -> the instance as the API shows it once the worker is done."""

    def create(kind: str = "redis", **body) -> dict:
        with committed():
            response = api.post(f"/api/storage/{kind}/instances", body)
        assert response.status_code == 202, response.content
        return api.get(f"/api/storage/{kind}/instances/{response.json()['id']}").json()

    return create


@pytest.fixture
def act(api, committed) -> Callable[..., dict]:
    """act(instance, action) -> the instance once the worker has carried out the action."""

    def act(instance: dict, action: str, *, expect: int = 202) -> dict:
        url = f"/api/storage/{instance['kind']}/instances/{instance['id']}"
        with committed():
            response = api.delete(url) if action == "delete" else api.post(f"{url}/{action}")
        assert response.status_code == expect, response.content
        after = api.get(url)
        return after.json() if after.status_code == 200 else {"status": "gone"}

    return act


def reconcile(*, later: float = 0):
    """One reconcile pass, as beat runs it, with its clock `later` seconds ahead of now; returns its report."""
    reconciler = Reconciler()
    if later:
        reconciler.clock = lambda: timezone.now() + timedelta(seconds=later)
    return reconciler.run_once()


# The fleet: a fake backend that places servers on nodes, and the operators who look after it.
# Personas: vera is staff who may view instances; carl is staff who may change them.

GiB = 2**30
LARGE = 4 * GiB + 2**20


@pytest.fixture
def nodes(settings, fake) -> FakeFleetBackend:
    """New instances go on the fake fleet, on node "small" (4 GiB) or "large" (4 GiB and 1 MiB: the
    first instance goes there, the next on "small"); "spare" is not labelled, so it takes none. No
    other backend that places servers is configured (the swarm would ask a real manager)."""
    settings.STOCKROOM_BACKENDS = {
        "fake": {"BACKEND": "provisioning.backends.fake.FakeBackend"},
        "fleet": {"BACKEND": "provisioning.backends.fake.FakeFleetBackend"},
    }
    settings.STOCKROOM_DEFAULT_BACKEND = "fleet"
    backend = get_backend("fleet")
    assert isinstance(backend, FakeFleetBackend)
    backend.reset()
    backend.add_node("n0small", hostname="db-a", address="10.9.0.2", memory=4 * GiB)
    backend.add_node("n1large", hostname="db-b", address="10.9.0.3", public_host="db2.example.com", memory=LARGE)
    backend.add_node("n2spare", hostname="portal", address="10.9.0.4", labelled=False, role="manager", memory=2 * GiB)
    return backend


def staff(django_user_model, name: str, *codenames: str):
    user = django_user_model.objects.create_user(name, password="staff-password-1", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return django_user_model.objects.get(pk=user.pk)


@pytest.fixture
def vera(django_user_model):
    return staff(django_user_model, "vera", "view_instance")


@pytest.fixture
def carl(django_user_model):
    return staff(django_user_model, "carl", "view_instance", "change_instance")


def web(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def admin_action(client: Client, action: str, *instances: dict):
    """The admin's instance list, with `action` run on `instances` (as the API shows them)."""
    selected = [instance["id"] for instance in instances]
    return client.post("/admin/provisioning/instance/", {"action": action, "_selected_action": selected}, follow=True)
