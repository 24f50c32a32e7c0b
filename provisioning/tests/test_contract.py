"""The API keeps the contract its own OpenAPI schema states, as schemathesis checks it.

Requests made from the schema, valid and invalid, go to the app with alice's token: no answer
may be a 5xx, every answer to a valid request must fit its response schema, and every invalid
request must be refused with a 4xx. (Two of schemathesis's checks are left out: the schema does
not list each error status, and it cannot say that a body's options depend on the kind in the
path or on each other, so some schema-valid bodies are rightly refused.)

Each test runs in a transaction that is rolled back. Services queue their tasks when the
transaction commits, so no create reaches a worker or starts a server; a guard makes sure.
"""

import pytest
import schemathesis
from celery.app.task import Task
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.specs.openapi.checks import positive_data_acceptance, status_code_conformance

from provisioning.engines import engines
from provisioning.models import Instance, Snapshot, Status
from provisioning.services.tokens import create_token

pytestmark = pytest.mark.django_db

# Loaded through the app itself, as a client would; the schema is built at this moment.
schema = schemathesis.openapi.from_wsgi("/api/schema", get_wsgi_application())


@schema.hook
def filter_failure(context, failure, case, response) -> bool:
    """Every failure counts but one of schemathesis's own making: an invalid form body (say, [])
    that reached the wire as no field at all, which is the empty form, {}, and fits the schema."""
    empty_form = case.media_type == "application/x-www-form-urlencoded" and not response.request.body
    return not (isinstance(failure, AcceptedNegativeData) and empty_form)


@pytest.fixture
def nothing_is_queued(monkeypatch):
    queued = []
    monkeypatch.setattr(Task, "apply_async", lambda task, *args, **kwargs: queued.append(task.name))
    yield
    assert queued == [], "the contract test must not start servers"


@pytest.fixture
def one_connection():
    """Requests run on the test's own database connection, inside its transaction, as the test client does."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def existing(api, alice, settings) -> dict[str, int]:
    """A running instance of every kind, a webhook with deliveries and a spare token (not the one the
    requests send, which a DELETE must not revoke), for the paths that take an id."""
    # The contract, not the capacity, is under test: no quota or budget runs out (503: no room).
    settings.STOCKROOM_QUOTA = settings.STOCKROOM_WEBHOOK_LIMIT = 10_000
    settings.STOCKROOM_MEMORY_QUOTA = settings.STOCKROOM_MEMORY_BUDGET = 2**50
    ids = {"webhook": api.post("/api/webhooks", {"url": "https://ci.example.com/hook"}).json()["id"]}
    ids["token"] = create_token(owner=alice, name="spare")[0].pk
    for kind in engines():
        ids[kind] = api.post(f"/api/storage/{kind}/instances", {}).json()["id"]
        ids[f"{kind} snapshot"] = Snapshot.objects.create(
            owner=alice, kind=kind, instance_id=ids[kind], status="ready", file=f"{kind}/none", checksum="sha256:0"
        ).pk
    Instance.objects.update(status=Status.RUNNING)
    return ids


@schema.parametrize()
@hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_the_api_keeps_its_schema(case, api, existing, nothing_is_queued, one_connection):
    if case.meta.generation.mode.is_positive and "id" in (case.path_parameters or {}):
        # Valid ids of things that exist, so valid requests reach more than a 404.
        owner = case.path_parameters.get("kind") or ("token" if "/auth/tokens/" in case.path else "webhook")
        if "/snapshots/{id}" in case.path:
            owner += " snapshot"
        case.path_parameters["id"] = existing[owner]
    case.call_and_validate(
        headers={"Authorization": f"Token {api.token}"},
        excluded_checks=[status_code_conformance, positive_data_acceptance],
    )
