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
from django.utils import timezone

from provisioning.backends.base import get_backend
from provisioning.backends.fake import FakeBackend
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
