"""Attacks through webhooks (issue 12): receivers that stall workers, and replayed deliveries."""

import select
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from portal.celery import app
from provisioning.models import InstanceEvent, WebhookDelivery
from provisioning.services import jobs, webhooks
from provisioning.services.webhooks import CUT_SHORT, Deadline, DeadlinePassed, Sender

from .conftest import Worker, receiver_port, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

README = settings.BASE_DIR / "README.md"


class Trickler:
    """A receiver on 127.0.0.1 that reads the request, then sends `prefix` one byte every
    `every` seconds until the client hangs up; it notes when each connection opened and closed."""

    def __init__(self, *, every: float = 2.0, prefix: bytes = b"HTTP/1.1 200 OK\r\n", read_request: bool = True):
        self.every, self.prefix, self.read_request = every, prefix, read_request
        self.connections: list[dict] = []
        self.listener = socket.create_server(("127.0.0.1", receiver_port()), backlog=64)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = {"opened": time.monotonic(), "closed": None, "sent": 0}
            self.connections.append(record)
            threading.Thread(target=self._trickle, args=(conn, record), daemon=True).start()

    def _trickle(self, conn: socket.socket, record: dict) -> None:
        with conn:
            if self.read_request:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    request += chunk
            for byte in self.prefix * 1000:
                readable, _, _ = select.select([conn], [], [], self.every)
                if readable and not conn.recv(65536):  # the client hung up
                    break
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    break
                record["sent"] += 1
            record["closed"] = time.monotonic()

    def close(self) -> None:
        self.closing = True
        self.listener.close()


@pytest.fixture
def trickler():
    trickler = Trickler()
    yield trickler
    trickler.close()


# A receiver that trickles cannot stall the workers ------------------------------------------------


DEADLINE = 3  # seconds, for the workers in these tests: long enough for a per-read timeout never to fire


@pytest.fixture
def pools(broker, queued_for_real, tmp_path):
    """The two pools `make run` starts: the default worker, as run-all starts it (no -Q), and the
    webhooks worker."""
    env = {"STOCKROOM_WEBHOOK_DEADLINE": str(DEADLINE), "STOCKROOM_WEBHOOK_ATTEMPTS": "1"}
    default = Worker(tmp_path / "default.log", queues=None, env=env)
    hooks = Worker(tmp_path / "webhooks.log", queues="webhooks", concurrency=4, env=env)
    default.start()
    hooks.start()
    yield default, hooks
    for worker in (default, hooks):
        if worker.process.poll() is None:
            worker.stop()


def create_and_time(api) -> tuple[int, float]:
    started = time.monotonic()
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running", timeout=60)
    return pk, time.monotonic() - started


def test_ten_trickling_receivers_do_not_delay_a_create(api, pools, trickler):
    default, hooks_pool = pools
    baseline_pk, baseline = create_and_time(api)  # the usual time, on this machine, now
    hooks = [api.post("/api/webhooks", {"url": trickler.url}).json()["id"] for _ in range(10)]

    first, _ = create_and_time(api)  # its 20 deliveries now fill the webhooks pool
    wait_until(lambda: len(trickler.connections) >= 4, 30, "the webhooks pool to be busy trickling")
    second, took = create_and_time(api)
    assert took < max(30, baseline + 15), f"a create took {took:.1f} s beside slow receivers (usually {baseline:.1f} s)"
    assert any(c["closed"] is None for c in trickler.connections), "deliveries were still trickling meanwhile"
    assert "Task provisioning.tasks.deliver_webhook[" not in default.log.read_text(), "the default pool sent none"
    assert "Task provisioning.tasks.deliver_webhook[" in hooks_pool.log.read_text()

    deliveries = WebhookDelivery.objects.filter(webhook_id__in=hooks)
    assert deliveries.count() == 40  # 10 webhooks x (provisioning, running) x 2 instances
    wait_until(lambda: not deliveries.filter(status="pending").exists(), 90, "every delivery to end")
    message = f"The {DEADLINE} s deadline passed before the receiver had answered; the attempt was cut off."
    assert set(deliveries.values_list("status", "attempts", "error")) == {
        ("failed", 1, f"{message} Gave up after 1 attempt.")
    }
    wait_until(lambda: all(c["closed"] is not None for c in trickler.connections), 10, "the connections to close")
    assert len(trickler.connections) == 40
    for connection in trickler.connections:
        held = connection["closed"] - connection["opened"]
        assert DEADLINE - 0.5 < held < DEADLINE + 2.5, f"a connection was held {held:.1f} s"
        assert connection["sent"] >= 1  # it did answer, a byte at a time: no read ever timed out

    for hook in hooks:
        api.delete(f"/api/webhooks/{hook}")
    for pk in (baseline_pk, first, second):
        api.delete(f"/api/storage/redis/instances/{pk}")
        wait_for_status(api, "redis", pk, "gone")


def test_the_default_worker_leaves_the_webhooks_queue_to_its_pool(pools, admin_client):
    _, hooks = pools
    queues = app.control.inspect(timeout=2).active_queues() or {}
    served = {name.split("@")[0]: {queue["name"] for queue in found} for name, found in queues.items()}
    assert served == {"default": {"celery"}, "webhooks": {"webhooks"}}
    assert app.amqp.router.route({}, "provisioning.tasks.deliver_webhook")["queue"].name == "webhooks"

    workers = admin_client.get("/healthz").json()["checks"]["workers"]
    assert workers["ok"] and workers["detail"] == "Workers answered for the celery and webhooks queues."
    hooks.stop()
    workers = admin_client.get("/healthz").json()["checks"]["workers"]
    assert workers["ok"], "deliveries wait, but the portal can still do its job"
    assert workers["detail"].startswith("Degraded: no worker consumes the webhooks queue")


def test_a_lost_retry_is_queued_again_on_the_webhooks_queue(api, broker, receiver, tmp_path):
    """The reconciler's sweep of deliveries whose queued retry was lost sends them to the webhooks
    queue: only a webhooks worker runs here, and it delivers them."""
    hook = api.post("/api/webhooks", {"url": receiver.url}).json()["id"]
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]  # run inline (eager), delivered
    wait_for_status(api, "redis", pk, "running")
    assert len(receiver.received) == 2
    WebhookDelivery.objects.update(status="pending", next_attempt_at=timezone.now() - timedelta(minutes=5))

    hooks = Worker(tmp_path / "webhooks.log", queues="webhooks")
    hooks.start()
    app.conf.task_always_eager = False
    try:
        assert webhooks.resend_due(timezone.now()) == 2
        wait_until(lambda: len(receiver.received) == 4, 30, "the webhooks worker to send them again")
    finally:
        app.conf.task_always_eager = True
        hooks.stop()
    assert set(WebhookDelivery.objects.filter(webhook_id=hook).values_list("status", "attempts")) == {("delivered", 2)}
    api.delete(f"/api/storage/redis/instances/{pk}")


# Each part of an attempt ends by the deadline -------------------------------------------------------


def timed_post(url: str, seconds: float) -> float:
    started = time.monotonic()
    with pytest.raises(DeadlinePassed, match=f"The {seconds:g} s deadline passed"):
        webhooks.post(url, b"{}", {"Content-Type": "application/json"}, Deadline(seconds))
    return time.monotonic() - started


def test_an_answer_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline():
    trickler = Trickler(every=0.3)
    try:
        assert 2 <= timed_post(trickler.url, 2) < 3
        wait_until(lambda: trickler.connections[0]["closed"] is not None, 5, "the connection to close")
        assert trickler.connections[0]["sent"] >= 4  # bytes kept coming; the deadline cut it anyway
    finally:
        trickler.close()


def test_a_tls_handshake_trickled_a_byte_at_a_time_is_cut_off_at_the_deadline():
    # A TLS record header announcing 16 KB, then the rest one byte at a time.
    trickler = Trickler(every=0.3, prefix=b"\x16\x03\x03\x40\x00", read_request=False)
    try:
        assert 2 <= timed_post(trickler.url.replace("http:", "https:"), 2) < 3
    finally:
        trickler.close()


def test_a_slow_dns_answer_is_cut_off_at_the_deadline(monkeypatch):
    real_lookup = socket.getaddrinfo

    def slow_lookup(host, *args, **kwargs):
        if host == "slow.example.com":
            time.sleep(5)
        return real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_lookup)
    assert 2 <= timed_post("http://slow.example.com/hook", 2) < 3


# An attempt is counted before it is sent -----------------------------------------------------------


def test_an_attempt_cut_short_by_a_killed_worker_is_counted(api, broker, tmp_path, settings):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]  # inline (eager), before any webhook
    wait_for_status(api, "redis", pk, "running")
    silent = Trickler(every=60, prefix=b"H")  # reads the request, then says nothing for a minute
    hook = api.post("/api/webhooks", {"url": silent.url}).json()["id"]
    delivery = WebhookDelivery.objects.create(webhook_id=hook, event=InstanceEvent.objects.filter(instance_id=pk)[0])

    hooks = Worker(tmp_path / "webhooks.log", queues="webhooks", env={"STOCKROOM_WEBHOOK_ATTEMPTS": "1"})
    hooks.start()
    app.conf.task_always_eager = False
    try:
        jobs.send("deliver_webhook", delivery.pk)
        wait_until(lambda: len(silent.connections) == 1, 30, "the worker to be sending")
        hooks.kill()  # mid-send, on its last attempt: no outcome recorded
    finally:
        app.conf.task_always_eager = True
        silent.close()
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts, delivery.error) == ("pending", 1, CUT_SHORT)

    # Once its hold has lapsed, the reconciler's sweep hands it to a worker again, which gives up
    # without sending: the attempt that was cut short counted.
    settings.STOCKROOM_WEBHOOK_ATTEMPTS = 1
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())
    Sender().deliver(delivery.pk)
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("failed", 1)
    assert delivery.error == f"{CUT_SHORT} Gave up after 1 attempt."
    assert len(silent.connections) == 1
    api.delete(f"/api/storage/redis/instances/{pk}")


# The README's receiver rejects a replay ------------------------------------------------------------


def readme_receiver() -> dict:
    """The receiver example of the README, run as it is written there."""
    text = README.read_text().split("<!-- receiver-example -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(text, "README.md (receiver example)", "exec"), namespace)
    return namespace


class LaterClock:
    """time, as the receiver's module sees it, `offset` seconds later."""

    def __init__(self, offset: float):
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset


def test_the_readme_receiver_accepts_a_delivery_and_rejects_its_replay(api, receiver):
    hook = api.post("/api/webhooks", {"url": receiver.url}).json()
    pk = api.post("/api/storage/redis/instances", {"name": "cache"}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    headers, body = receiver.received[0]  # a real delivery, as a receiver got it
    example = readme_receiver()
    example["verify_webhook"](hook["secret"], headers, body)  # accepted

    # Captured and replayed six minutes later: refused by its timestamp.
    example["time"] = LaterClock(6 * 60)
    with pytest.raises(ValueError, match="more than 5 minutes off"):
        example["verify_webhook"](hook["secret"], headers, body)
    # Given a fresh timestamp instead: refused by its signature.
    fresh = headers | {"webhook-timestamp": str(int(time.time() + 6 * 60))}
    with pytest.raises(ValueError, match="signature does not match"):
        example["verify_webhook"](hook["secret"], fresh, body)
    # Another secret, or another body: refused.
    example["time"] = time
    with pytest.raises(ValueError, match="signature does not match"):
        example["verify_webhook"](webhooks.new_secret(), headers, body)
    with pytest.raises(ValueError, match="signature does not match"):
        example["verify_webhook"](hook["secret"], headers, body.replace(b"cache", b"other"))
    # A request without the headers is refused the same way (a ValueError, not a KeyError).
    with pytest.raises(ValueError):
        example["verify_webhook"](hook["secret"], {}, body)
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_a_url_that_is_not_ascii_is_sent_percent_encoded(api, receiver):
    url = receiver.url.replace("/hooks/stockroom", "/hooks/café?zone=é")
    assert api.post("/api/webhooks", {"url": url}).status_code == 201
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    assert receiver.received, "delivered"
    assert set(receiver.paths) == {"/hooks/caf%C3%A9?zone=%C3%A9"}
    api.delete(f"/api/storage/redis/instances/{pk}")


def test_a_delivery_signed_long_ago_is_rejected_by_the_readme_receiver(api, receiver, monkeypatch):
    """The timestamp is the attempt's own: a delivery whose clock says ten minutes ago is refused."""
    hook = api.post("/api/webhooks", {"url": receiver.url}).json()
    monkeypatch.setattr(Sender, "clock", staticmethod(lambda: time.time() - 600))
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    wait_for_status(api, "redis", pk, "running")
    headers, body = receiver.received[0]
    with pytest.raises(ValueError, match="more than 5 minutes off"):
        readme_receiver()["verify_webhook"](hook["secret"], headers, body)
    api.delete(f"/api/storage/redis/instances/{pk}")
