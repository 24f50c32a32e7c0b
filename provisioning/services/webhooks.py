"""Webhooks: users register URLs; every status change of their instances is POSTed there, signed
the Standard Webhooks way (webhook-id, webhook-timestamp, webhook-signature).

Deliveries run on their own queue and worker pool (never in a request, never beside provisioning),
each attempt within a wall-clock deadline, retried with exponential backoff. Each attempt is
claimed, and counted, by one conditional UPDATE, so a delivery that both a retry and the
reconciler's sweep pick up is still sent once per attempt.
"""

import base64
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import certifi
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from ..models import DeliveryStatus, Webhook, WebhookDelivery
from . import jobs

if TYPE_CHECKING:
    from django.contrib.auth.models import User
    from django.db.models import QuerySet

logger = logging.getLogger(__name__)

SECRET_PREFIX = "whsec_"
LEGACY_SIGNATURE_HEADER = "X-Stockroom-Signature"
DELIVERY_HEADER = "X-Stockroom-Delivery"
URL_RULE = "an http:// or https:// URL"
# How long after its deadline a delivery stays held by the worker sending it.
# Characters a request target may hold as they are (RFC 3986: reserved, unreserved, and "%" of
# what is already encoded).
URL_SAFE = "/?&=:@!$'()*+,;~%-._"
CLAIM_MARGIN = 30.0
CUT_SHORT = "No outcome recorded: the attempt is under way, or its worker stopped mid-send."


class TooManyWebhooks(Exception):
    pass


class PrivateAddress(Exception):
    """The URL leads to an address inside the portal's own network."""


class Unresolvable(Exception):
    pass


NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def is_public(address: str) -> bool:
    """Whether an address is on the public internet, IPv4 hidden inside IPv6 included."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6:
        if ip in IPV4_COMPATIBLE:
            return False
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(inner is not None and not inner.is_global for inner in embedded):
            return False
    return ip.is_global


class DeadlinePassed(Exception):
    """The attempt ran out of its wall-clock time (STOCKROOM_WEBHOOK_DEADLINE)."""


class CouldNotConnect(Exception):
    """No connection to an address; the next checked address may still answer."""


class Deadline:
    """A point in time that a whole attempt must end by. left() raises once it has passed."""

    clock = staticmethod(time.monotonic)

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = self.clock() + seconds

    def passed(self) -> bool:
        return self.clock() >= self.at

    def left(self) -> float:
        left = self.at - self.clock()
        if left <= 0:
            raise DeadlinePassed(self.message())
        return left

    def message(self) -> str:
        return f"The {self.seconds:g} s deadline passed before the receiver had answered; the attempt was cut off."


def resolve(host: str, port: int, deadline: Deadline) -> list[str]:
    """The addresses to connect to, in the resolver's order: every address `host` has must be
    public (unless STOCKROOM_WEBHOOK_ALLOW_PRIVATE), so that a webhook cannot probe the portal's own
    network or its instances. The request then goes to these very addresses, so a second lookup
    (DNS rebinding) cannot lead it elsewhere. A lookup that outlasts the deadline is left behind."""
    answer: list[Any] = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(deadline.left())
    if not answer:
        raise DeadlinePassed(deadline.message())
    if isinstance(answer[0], Exception):
        raise Unresolvable(f"Could not resolve {host} ({answer[0]}).")
    addresses = list(dict.fromkeys(str(info[4][0]) for info in answer[0]))
    if not settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE:
        for address in addresses:
            if not is_public(address):
                raise PrivateAddress(
                    f"{host} is a non-public address ({address}); webhooks may only reach public addresses."
                )
    return addresses


def post(url: str, body: bytes, headers: dict[str, str], deadline: Deadline) -> int:
    """POST `body` to `url` at the addresses resolve() checked, the next one only if connecting
    to one fails; returns the status code. No redirects, nothing read but the status and headers.
    Everything, the lookup included, ends by `deadline` (DeadlinePassed), however slowly the
    receiver trickles its bytes.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").encode("idna").decode()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    # As a browser or urllib3 would send it: what is not ASCII, percent-encoded (http.client sends
    # ASCII only); what is already encoded stays as it is.
    path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=URL_SAFE)
    name = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets
    default_port = port == (443 if parts.scheme == "https" else 80)
    headers = headers | {"Host": name if default_port else f"{name}:{port}"}
    *others, last = resolve(host, port, deadline)
    request = _Request(parts.scheme, port, host, path, body, headers)
    for address in others:
        try:
            return _post_to(address, request, deadline)
        except CouldNotConnect:
            continue  # the next address; what the receiver answers is final
    try:
        return _post_to(last, request, deadline)
    except CouldNotConnect as exc:
        raise exc.__cause__ or exc from None


@dataclass(frozen=True)
class _Request:
    scheme: str
    port: int
    host: str
    path: str
    body: bytes
    headers: dict[str, str]


class _Watchdog:
    """Shuts the socket down at the deadline. A call blocked on it (the TLS handshake, a send, a
    read) then returns at once, which no per-call timeout can promise: a receiver that sends one
    byte a second would restart a read timeout with every byte."""

    def __init__(self, sock: socket.socket, deadline: Deadline) -> None:
        self._fd = sock.fileno()
        self._lock = threading.Lock()
        self._stopped = False
        self._timer = threading.Timer(deadline.left(), self._cut)
        self._timer.daemon = True
        self._timer.start()

    def _cut(self) -> None:
        with self._lock:  # never after stop(): the descriptor may belong to someone else by then
            if self._stopped:
                return
            sock = socket.socket(fileno=self._fd)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            finally:
                sock.detach()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._timer.cancel()


class _Connection(http.client.HTTPConnection):
    """http.client over a socket that is already connected (and checked)."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__("receiver")
        self.sock = sock

    def connect(self) -> None:
        pass


def _post_to(address: str, request: _Request, deadline: Deadline) -> int:
    try:
        sock = socket.create_connection((address, request.port), timeout=deadline.left())
    except OSError as exc:
        if deadline.passed():
            raise DeadlinePassed(deadline.message()) from None
        raise CouldNotConnect(str(exc)) from exc
    watchdog = _Watchdog(sock, deadline)
    connection = None
    try:
        if request.scheme == "https":  # the certificate must match the name, not the address
            context = ssl.create_default_context(cafile=certifi.where())
            # The handshake is done here, so that the socket is closed only once the watchdog stopped.
            sock = context.wrap_socket(sock, server_hostname=request.host, do_handshake_on_connect=False)
            sock.do_handshake()
        connection = _Connection(sock)
        connection.request("POST", request.path, body=request.body, headers=request.headers)
        response = connection.getresponse()  # the status line and headers; the body is not read
        response.close()
        return response.status
    except (OSError, http.client.HTTPException):
        if deadline.passed():
            raise DeadlinePassed(deadline.message()) from None
        raise
    finally:
        watchdog.stop()
        if connection is not None:
            connection.close()
        sock.close()


def create_webhook(*, owner: "User", url: str) -> tuple[Webhook, str]:
    """Register `url` for `owner`; returns the webhook and its signing secret (shown only now).

    Raises ValidationError for a URL that is not http(s), TooManyWebhooks past the limit.
    """
    try:
        URLValidator(schemes=["http", "https"])(url)
        parts = urlsplit(url)
        if parts.port == 0:  # .port itself raises ValueError outside 0-65535
            raise ValueError("port 0")
    except (ValidationError, ValueError):
        raise ValidationError({"url": f"{url!r} is not {URL_RULE}."}) from None
    if parts.username is not None:
        raise ValidationError({"url": "Put no user name or password in the URL; check the signature instead."})
    host = parts.hostname or ""
    if not settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE:
        try:
            resolve(host, 443, Deadline(settings.STOCKROOM_WEBHOOK_DEADLINE))  # early feedback; each send checks again
        except PrivateAddress as exc:
            raise ValidationError({"url": str(exc)}) from None
        except (Unresolvable, DeadlinePassed):
            pass  # a receiver that is not up yet is fine
    with transaction.atomic():
        # One registration at a time per user, so the limit cannot be raced past.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        count = Webhook.objects.filter(owner=owner).count()
        if count >= settings.STOCKROOM_WEBHOOK_LIMIT:
            raise TooManyWebhooks(
                f"You have {count} webhooks and the limit is {settings.STOCKROOM_WEBHOOK_LIMIT}. Delete one first."
            )
        secret = new_secret()
        webhook = Webhook.objects.create(owner=owner, url=url, secret=secret)
    logger.info("Webhook %s registered by %s", webhook.pk, owner)
    return webhook, secret


def new_secret() -> str:
    """A Standard Webhooks secret: whsec_ and the base64 of 32 random bytes, the HMAC key."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signing_key(secret: str) -> bytes:
    """The HMAC key a whsec_ secret stands for: the bytes its base64 encodes."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header (Standard Webhooks, v1): the base64 HMAC-SHA256 of
    "id.timestamp.body", so that a receiver can tell a replay by its timestamp."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(signing_key(secret), signed, hashlib.sha256).digest()).decode()


def legacy_sign(secret: str, body: bytes) -> str:
    """The old X-Stockroom-Signature header, for webhooks registered before: HMAC-SHA256 of the
    body alone, hex. It has no timestamp, so a receiver that checks only this cannot tell a replay."""
    return "sha256=" + hmac.new(signing_key(secret), body, hashlib.sha256).hexdigest()


def payload(delivery: WebhookDelivery) -> dict[str, Any]:
    event, instance = delivery.event, delivery.event.instance
    return {
        "delivery": delivery.pk,
        "type": event.type,
        "time": event.created_at.isoformat(),
        "instance": {"id": instance.pk, "kind": instance.kind, "name": instance.name},
        "from": event.from_status,
        "to": event.to_status,
        "reason": event.reason,
    }


def gave_up_after(attempts: int) -> str:
    return f"Gave up after {attempts} attempt{'' if attempts == 1 else 's'}."


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): doubling from the base."""
    return float(settings.STOCKROOM_WEBHOOK_BACKOFF * 2 ** (attempt - 1))


class Sender:
    """Sends one delivery. `post` and `clock` are class attributes so tests can swap them."""

    post = staticmethod(post)
    clock = staticmethod(time.time)

    def deliver(self, delivery_id: int) -> None:
        """Attempt a pending delivery that is due; record the outcome; schedule a retry if any.

        The attempt is counted before anything is sent, and the delivery is held until the
        deadline (plus a margin) has passed: a worker that dies mid-send leaves a counted attempt
        that the reconciler's sweep sends again, so a receiver that kills workers runs out of
        attempts like any other.
        """
        deadline = settings.STOCKROOM_WEBHOOK_DEADLINE
        now = timezone.now()
        due = WebhookDelivery.objects.filter(pk=delivery_id, status=DeliveryStatus.PENDING, next_attempt_at__lte=now)
        if self._give_up_if_spent(due):
            return
        claimed = due.filter(attempts__lt=settings.STOCKROOM_WEBHOOK_ATTEMPTS).update(
            attempts=F("attempts") + 1,
            next_attempt_at=now + timedelta(seconds=deadline + CLAIM_MARGIN),
            response_code=None,
            error=CUT_SHORT,  # what stays if this worker dies before it records the outcome
        )
        if not claimed:
            return  # delivered, given up, not due yet, or another worker is sending it
        delivery = WebhookDelivery.objects.select_related("webhook", "event__instance").filter(pk=delivery_id).first()
        if delivery is None:
            return  # its webhook was deleted meanwhile
        code, error, permanent = None, "", False
        try:
            code = self._send(delivery, Deadline(deadline))
            if not 200 <= code < 300:
                error = f"The receiver answered {code}."
        except DeadlinePassed as exc:
            error = str(exc)
        except PrivateAddress as exc:  # the same every time: no point in retrying
            error, permanent = str(exc), True
        except Unresolvable as exc:
            error = str(exc)
        except ssl.SSLCertVerificationError as exc:
            error = f"The receiver's TLS certificate was refused ({exc.verify_message})."
        except ssl.SSLError as exc:
            error = f"TLS with the receiver failed ({exc.reason or type(exc).__name__})."
        except (OSError, http.client.HTTPException) as exc:
            error = f"Could not reach the receiver ({type(exc).__name__})."
        except Exception as exc:  # counted as a failed attempt, never retried forever
            logger.exception("Webhook delivery %s failed", delivery.pk)
            error = f"Could not send it ({type(exc).__name__})."
        self._record(delivery, code, error, permanent=permanent)

    @staticmethod
    def _give_up_if_spent(due: "QuerySet[WebhookDelivery]") -> bool:
        """A delivery whose last attempt was cut short (its worker died) has no attempt left."""
        spent = due.filter(attempts__gte=settings.STOCKROOM_WEBHOOK_ATTEMPTS).values("attempts", "error").first()
        if spent is None:
            return False
        gave_up = f"{spent['error']} {gave_up_after(spent['attempts'])}"
        due.filter(attempts=spent["attempts"]).update(status=DeliveryStatus.FAILED, error=gave_up)
        return True

    def _send(self, delivery: WebhookDelivery, deadline: Deadline) -> int:
        body = json.dumps(payload(delivery), separators=(",", ":")).encode()
        message_id, timestamp = delivery.msg_id, int(self.clock())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Stockroom-Webhooks/2",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(delivery.webhook.secret, message_id, timestamp, body),
            DELIVERY_HEADER: str(delivery.pk),
        }
        if delivery.webhook.legacy_signature:
            headers[LEGACY_SIGNATURE_HEADER] = legacy_sign(delivery.webhook.secret, body)
        return self.post(delivery.webhook.url, body, headers, deadline)

    @staticmethod
    def _record(delivery: WebhookDelivery, code: int | None, error: str, *, permanent: bool = False) -> None:
        """The outcome of the attempt that deliver() counted (delivery.attempts includes it)."""
        attempts = delivery.attempts
        changes: dict[str, Any] = {"response_code": code, "error": error}
        if not error:
            changes["status"] = DeliveryStatus.DELIVERED
        elif permanent:
            changes["status"] = DeliveryStatus.FAILED
        elif attempts >= settings.STOCKROOM_WEBHOOK_ATTEMPTS:
            changes["status"] = DeliveryStatus.FAILED
            changes["error"] = f"{error} {gave_up_after(attempts)}"
        else:
            delay = retry_delay(attempts)
            changes["next_attempt_at"] = timezone.now() + timedelta(seconds=delay)
        WebhookDelivery.objects.filter(pk=delivery.pk).update(**changes)
        if error:
            logger.info("Webhook delivery %s, attempt %s: %s", delivery.pk, attempts, error)
        if "next_attempt_at" in changes:
            jobs.send("deliver_webhook", delivery.pk, countdown=delay)


def due_deliveries(now: datetime) -> list[int]:
    """Pending deliveries whose time has come; the reconciler re-queues any a lost task left behind."""
    return list(
        WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now).values_list(
            "pk", flat=True
        )[:1000]
    )


def resend_due(now: datetime) -> int:
    """Queue again every pending delivery due by `now` (a queued retry was lost); returns how many."""
    due = due_deliveries(now)
    for pk in due:
        jobs.send("deliver_webhook", pk)
    return len(due)
