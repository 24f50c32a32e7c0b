"""Webhooks: registered by their owner, told about every status change, signed, retried."""

import base64
import hashlib
import hmac
import json
import re
import secrets
import socket

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client

from provisioning.models import InstanceEvent, Webhook, WebhookDelivery
from provisioning.services.webhooks import is_public, new_secret, retry_delay

from .conftest import port_refuses, verify, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def register(api, url: str) -> dict:
    response = api.post("/api/webhooks", {"url": url})
    assert response.status_code == 201, response.json()
    return response.json()


def test_the_secret_is_shown_once_and_stored_encrypted(api):
    hook = register(api, "https://ci.example.com/stockroom")
    assert hook["secret"].startswith("whsec_")
    assert len(base64.b64decode(hook["secret"].removeprefix("whsec_"), validate=True)) == 32  # the key
    assert hook["legacy_signature"] is False
    assert "secret" not in api.get(f"/api/webhooks/{hook['id']}").json()
    assert "secret" not in api.get("/api/webhooks").json()["results"][0]
    assert Webhook.objects.get().secret == hook["secret"]
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT secret FROM provisioning_webhook")
        assert hook["secret"] not in cursor.fetchone()[0]


@pytest.mark.parametrize("url", ["ftp://example.com/x", "javascript:alert(1)", "example.com/hook", "", "http://"])
def test_it_rejects_urls_that_are_not_http(api, url):
    response = api.post("/api/webhooks", {"url": url})
    assert response.status_code == 400
    assert "url" in response.json()
    assert not Webhook.objects.exists()


def test_it_limits_webhooks_per_user(api, settings):
    settings.STOCKROOM_WEBHOOK_LIMIT = 2
    register(api, "https://a.example.com/")
    register(api, "https://b.example.com/")
    response = api.post("/api/webhooks", {"url": "https://c.example.com/"})
    assert response.status_code == 403
    assert "limit is 2" in response.json()["detail"]


def test_outsiders_get_404(api, outsider):
    hook = register(api, "https://ci.example.com/stockroom")
    for path in (f"/api/webhooks/{hook['id']}", f"/api/webhooks/{hook['id']}/deliveries"):
        assert outsider.get(path).status_code == 404
    assert outsider.delete(f"/api/webhooks/{hook['id']}").status_code == 404
    assert outsider.get("/api/webhooks").json()["results"] == []
    assert api.delete(f"/api/webhooks/{hook['id']}").status_code == 204
    assert api.get(f"/api/webhooks/{hook['id']}").status_code == 404


def test_every_status_change_is_posted_signed(api, outsider, receiver):
    hook = register(api, receiver.url)
    register(outsider, receiver.url)  # charlie's webhook hears nothing of alice's instances
    pk = api.post("/api/storage/redis/instances", {"name": "cache"}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    api.delete(f"/api/storage/redis/instances/{pk}")
    wait_for_status(api, "redis", pk, "gone")

    transitions = [(event["from"], event["to"]) for event in receiver.events()]
    assert transitions == [("", "provisioning"), ("provisioning", "running"), ("running", "deleting"),
                           ("deleting", "deleted")]  # fmt: skip
    first = receiver.events()[0]
    assert first["type"] == "instance.status_changed"
    assert first["instance"] == {"id": pk, "kind": "redis", "name": "cache"}
    assert first["reason"] == "Requested by alice."
    for headers, body in receiver.received:
        assert verify(hook["secret"], headers, body)  # with the Standard Webhooks library
        tampered = body.replace(b'"cache"', b'"other"')
        assert not verify(hook["secret"], headers, tampered), "a changed body must fail verification"
        assert not verify(new_secret(), headers, body)
        moved = str(int(headers["webhook-timestamp"]) + 1)
        assert not verify(hook["secret"], headers | {"webhook-timestamp": moved}, body), "the timestamp is signed"
        assert "X-Stockroom-Signature" not in headers  # only webhooks registered before it get the old header
    assert len({headers["webhook-id"] for headers, _ in receiver.received}) == 4

    deliveries = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()
    assert deliveries["count"] == 4
    assert {(d["status"], d["attempts"], d["response_code"]) for d in deliveries["results"]} == {("delivered", 1, 204)}
    sent = {headers["webhook-id"] for headers, _ in receiver.received}
    assert {d["message_id"] for d in deliveries["results"]} == sent


def test_a_failing_receiver_is_retried(api, receiver, settings):
    settings.STOCKROOM_WEBHOOK_BACKOFF = 0  # retries come at once; the eager worker runs them inline
    hook = register(api, receiver.url)
    receiver.failures_left = 2
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")

    assert [event["to"] for event in receiver.events()] == ["provisioning", "running"]
    deliveries = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["results"]
    first = next(d for d in deliveries if d["event"]["to"] == "provisioning")
    assert (first["status"], first["attempts"], first["response_code"]) == ("delivered", 3, 204)
    tries = [headers for headers in receiver.attempts if headers["webhook-id"] == first["message_id"]]
    assert len(tries) == 3, "the webhook-id is the same on every attempt, so a receiver can drop a repeat"
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_a_receiver_that_stays_down_is_given_up_on(api, settings, unused_port):
    settings.STOCKROOM_WEBHOOK_BACKOFF = 0
    settings.STOCKROOM_WEBHOOK_ATTEMPTS = 3
    assert port_refuses(unused_port)
    hook = register(api, f"http://127.0.0.1:{unused_port}/hook")
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")

    deliveries = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["results"]
    assert len(deliveries) == 2
    for delivery in deliveries:
        assert delivery["status"] == "failed"
        assert delivery["attempts"] == 3
        assert delivery["error"] == "Could not reach the receiver (ConnectionRefusedError). Gave up after 3 attempts."
        assert delivery["next_attempt_at"] is None
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_retries_back_off_exponentially(settings):
    settings.STOCKROOM_WEBHOOK_BACKOFF = 10
    assert [retry_delay(attempt) for attempt in (1, 2, 3, 4)] == [10, 20, 40, 80]


def test_the_payload_is_compact_json(api, receiver):
    register(api, receiver.url)
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    headers, body = receiver.received[0]
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["delivery"] == int(headers["X-Stockroom-Delivery"])
    api.delete(f"/api/storage/redis/instances/{pk}")


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://10.1.2.3/hook", "http://169.254.169.254/latest", "http://[::1]/x"]
)
def test_it_refuses_non_public_addresses_by_default(api, settings, url):
    settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE = False
    response = api.post("/api/webhooks", {"url": url})
    assert response.status_code == 400
    assert "webhooks may only reach public addresses" in response.json()["url"][0]


def test_a_name_that_resolves_to_a_private_address_is_refused_at_send_time(api, settings, receiver):
    hook = register(api, receiver.url.replace("127.0.0.1", "localhost"))  # allowed while registering
    settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE = False  # say, the operator tightened it since
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    assert receiver.received == []
    delivery = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["results"][0]
    assert delivery["status"] == "failed" and delivery["attempts"] == 1
    assert delivery["error"].startswith("localhost is a non-public address (")
    api.delete(f"/api/storage/redis/instances/{pk}")


@pytest.mark.parametrize("url", ["http://example.com:99999/", "https://example.com:-1/"])
def test_it_rejects_impossible_ports(api, url):
    assert api.post("/api/webhooks", {"url": url}).status_code == 400


@pytest.mark.parametrize(
    "address",
    ["::127.0.0.1", "64:ff9b::7f00:1", "2002:7f00:1::", "::ffff:10.0.0.1", "0.0.0.0", "fe80::1%eth0", "100.64.0.1"],
)
def test_private_addresses_hidden_in_other_forms_are_not_public(address):
    assert not is_public(address)


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"])
def test_public_addresses_are_public(address):
    assert is_public(address)


def test_the_request_goes_to_the_address_that_was_checked(api, receiver, monkeypatch):
    """DNS rebinding: the name is looked up once per send, and the connection goes to that address."""
    real_lookup, lookups = socket.getaddrinfo, []

    def lookup(host, port, *args, **kwargs):
        if host != "hooks.example.com":
            return real_lookup(host, port, *args, **kwargs)
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    hook = register(api, receiver.url.replace("127.0.0.1", "hooks.example.com"))
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    assert len(receiver.received) == len(lookups) == 2  # provisioning, running: one lookup each
    headers, _ = receiver.received[0]
    assert headers["Host"] == f"hooks.example.com:{receiver.server.server_port}"
    deliveries = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["results"]
    assert {delivery["status"] for delivery in deliveries} == {"delivered"}
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_it_refuses_credentials_in_the_url(api):
    response = api.post("/api/webhooks", {"url": "https://user:secret@ci.example.com/hook"})
    assert response.status_code == 400
    assert "no user name or password" in response.json()["url"][0]


def test_the_next_checked_address_is_tried_when_one_refuses(api, receiver, monkeypatch):
    real_lookup = socket.getaddrinfo

    def lookup(host, port, *args, **kwargs):
        if host != "hooks.example.com":
            return real_lookup(host, port, *args, **kwargs)
        # Nothing listens on 127.0.0.2; the receiver is on 127.0.0.1.
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in ("127.0.0.2", "127.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    hook = register(api, receiver.url.replace("127.0.0.1", "hooks.example.com"))
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    deliveries = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["results"]
    assert {(delivery["status"], delivery["attempts"]) for delivery in deliveries} == {("delivered", 1)}
    api.delete(f"/api/storage/redis/instances/{pk}")


def migrate(target: str):
    """Migrate the provisioning app to `target`; returns the app registry as of then."""
    executor = MigrationExecutor(connection)
    executor.migrate([("provisioning", target)])
    executor.loader.build_graph()
    return executor.loader.project_state(("provisioning", target)).apps


def latest() -> str:
    """The provisioning app's newest migration."""
    [(_, name)] = MigrationExecutor(connection).loader.graph.leaf_nodes("provisioning")
    return name


def test_a_webhook_registered_before_keeps_its_key_and_its_old_header(api, receiver):
    """Migration 0008 wraps an old secret's bytes as whsec_ + base64; the old header still verifies."""
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    hook = register(api, receiver.url)
    for event in InstanceEvent.objects.filter(instance_id=pk):  # two deliveries made before the upgrade
        WebhookDelivery.objects.create(webhook_id=hook["id"], event=event, status="delivered")

    old_secret = f"whsec_{secrets.token_urlsafe(32)}"  # what registering answered before
    before = migrate("0007_access_tokens")
    before.get_model("provisioning", "Webhook").objects.update(secret=old_secret)
    migrate(latest())  # the upgrade, to the newest migration: later tests need every table

    webhook = Webhook.objects.get()
    assert webhook.legacy_signature
    assert webhook.secret == "whsec_" + base64.b64encode(old_secret.encode()).decode()  # what the README says
    assert len(set(WebhookDelivery.objects.values_list("message_id", flat=True))) == 2

    api.post(f"/api/storage/redis/instances/{pk}/restart")
    wait_for_status(api, "redis", pk, "running")
    assert len(receiver.received) == 2  # restarting, running
    for headers, body in receiver.received:
        old_code = "sha256=" + hmac.new(old_secret.encode(), body, hashlib.sha256).hexdigest()  # the old README's
        assert hmac.compare_digest(old_code, headers["X-Stockroom-Signature"])
        assert verify(webhook.secret, headers, body)
    assert api.get(f"/api/webhooks/{webhook.pk}").json()["legacy_signature"] is True
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_the_pages_register_show_the_secret_once_and_list_deliveries(alice, charlie, receiver, api):
    web, other = Client(), Client()
    web.force_login(alice)
    other.force_login(charlie)
    response = web.post("/webhooks/", {"url": "ftp://example.com/x"})
    assert response.status_code == 400 and "is not an http:// or https:// URL" in response.content.decode()

    response = web.post("/webhooks/", {"url": receiver.url})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    secret = re.search(r'<pre id="secret">(whsec_[A-Za-z0-9+/=]+)</pre>', response.content.decode())[1]
    assert "whsec_" not in web.get("/webhooks/").content.decode()  # shown once

    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    hook = Webhook.objects.get()
    page = web.get(f"/webhooks/{hook.pk}/").content.decode()
    for delivery in hook.deliveries.all():
        assert delivery.msg_id in page
    assert page.count('data-label="Attempts">1<') == 2 and page.count('data-label="Answer">204<') == 2
    assert all(verify(secret, headers, body) for headers, body in receiver.received)

    assert other.get(f"/webhooks/{hook.pk}/").status_code == 404
    assert other.post(f"/webhooks/{hook.pk}/delete/").status_code == 404
    assert web.post(f"/webhooks/{hook.pk}/delete/").status_code == 302
    assert not Webhook.objects.exists()
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_the_pages_show_a_failed_attempt_and_its_error(alice, api, settings, unused_port):
    settings.STOCKROOM_WEBHOOK_ATTEMPTS = 1
    web = Client()
    web.force_login(alice)
    web.post("/webhooks/", {"url": f"http://127.0.0.1:{unused_port}/hook"})
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    listing = web.get("/webhooks/").content.decode()
    assert 'data-label="Failed deliveries">2<' in listing
    page = web.get(f"/webhooks/{Webhook.objects.get().pk}/").content.decode()
    assert page.count("Could not reach the receiver (ConnectionRefusedError). Gave up after 1 attempt.") == 2
    api.delete(f"/api/storage/redis/instances/{pk}")
