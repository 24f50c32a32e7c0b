"""Webhooks: users register URLs; every status change of their instances is POSTed there, signed.

Deliveries run in the worker (never in a request), with a short timeout and exponential
backoff. Each one is claimed by a conditional UPDATE, so a delivery that both a retry and the
reconciler's sweep pick up is still sent once per attempt.
"""

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import certifi
import urllib3
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from ..models import DeliveryStatus, Webhook, WebhookDelivery
from . import jobs

if TYPE_CHECKING:
    from django.contrib.auth.models import User

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Stockroom-Signature"
DELIVERY_HEADER = "X-Stockroom-Delivery"
URL_RULE = "an http:// or https:// URL"


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


def resolve(host: str, port: int) -> list[str]:
    """The addresses to connect to, in the resolver's order: every address `host` has must be
    public (unless STOCKROOM_WEBHOOK_ALLOW_PRIVATE), so that a webhook cannot probe the portal's own
    network or its instances. The request then goes to these very addresses, so a second lookup
    (DNS rebinding) cannot lead it elsewhere."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"Could not resolve {host} ({exc}).") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in found))
    if not settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE:
        for address in addresses:
            if not is_public(address):
                raise PrivateAddress(
                    f"{host} is a non-public address ({address}); webhooks may only reach public addresses."
                )
    return addresses


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST `body` to `url` at the addresses resolve() checked, the next one only if connecting
    to one fails; returns the status code. No redirects, nothing read but the status line.
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").encode("idna").decode()
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    name = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets
    default_port = port == (443 if parts.scheme == "https" else 80)
    headers = headers | {"Host": name if default_port else f"{name}:{port}"}
    *others, last = resolve(host, port)
    request = _Request(parts.scheme, port, host, path, body, headers)
    for address in others:
        try:
            return _post_to(address, request, timeout=timeout)
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError):
            continue  # the next address; what the receiver answers is final
    return _post_to(last, request, timeout=timeout)


@dataclass(frozen=True)
class _Request:
    scheme: str
    port: int
    host: str
    path: str
    body: bytes
    headers: dict[str, str]


def _post_to(address: str, request: _Request, *, timeout: float) -> int:
    pool: urllib3.HTTPConnectionPool
    limit = urllib3.Timeout(total=timeout)
    if request.scheme == "https":  # the certificate must match the name, not the address
        pool = urllib3.HTTPSConnectionPool(
            address, request.port, server_hostname=request.host, assert_hostname=request.host,
            cert_reqs="CERT_REQUIRED", ca_certs=certifi.where(), timeout=limit, retries=False, maxsize=1,
        )  # fmt: skip
    else:
        pool = urllib3.HTTPConnectionPool(address, request.port, timeout=limit, retries=False, maxsize=1)
    path, body, headers = request.path, request.body, request.headers
    try:
        response = pool.urlopen("POST", path, body=body, headers=headers, redirect=False, preload_content=False)
        response.close()  # the status is all we need
        return response.status
    finally:
        pool.close()


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
            resolve(host, 443)  # early feedback; each send checks again
        except PrivateAddress as exc:
            raise ValidationError({"url": str(exc)}) from None
        except Unresolvable:
            pass  # a receiver that is not up yet is fine
    with transaction.atomic():
        # One registration at a time per user, so the limit cannot be raced past.
        get_user_model().objects.select_for_update().filter(pk=owner.pk).first()
        count = Webhook.objects.filter(owner=owner).count()
        if count >= settings.STOCKROOM_WEBHOOK_LIMIT:
            raise TooManyWebhooks(
                f"You have {count} webhooks and the limit is {settings.STOCKROOM_WEBHOOK_LIMIT}. Delete one first."
            )
        secret = f"whsec_{secrets.token_urlsafe(32)}"
        webhook = Webhook.objects.create(owner=owner, url=url, secret=secret)
    logger.info("Webhook %s registered by %s", webhook.pk, owner)
    return webhook, secret


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: HMAC-SHA256 of the exact body, keyed with the secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(delivery: WebhookDelivery) -> dict[str, Any]:
    event, instance = delivery.event, delivery.event.instance
    return {
        "delivery": delivery.pk,
        "type": "instance.status_changed",
        "time": event.created_at.isoformat(),
        "instance": {"id": instance.pk, "kind": instance.kind, "name": instance.name},
        "from": event.from_status,
        "to": event.to_status,
        "reason": event.reason,
    }


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): doubling from the base."""
    return float(settings.STOCKROOM_WEBHOOK_BACKOFF * 2 ** (attempt - 1))


class Sender:
    """Sends one delivery. `post` is a class attribute so tests can swap the HTTP client."""

    post = staticmethod(post)

    def deliver(self, delivery_id: int) -> None:
        """Attempt a pending delivery that is due; record the outcome; schedule a retry if any."""
        timeout = settings.STOCKROOM_WEBHOOK_TIMEOUT
        now = timezone.now()
        claimed = WebhookDelivery.objects.filter(
            pk=delivery_id, status=DeliveryStatus.PENDING, next_attempt_at__lte=now
        ).update(next_attempt_at=now + timedelta(seconds=timeout + 30))
        if not claimed:
            return  # delivered, given up, not due yet, or another worker is sending it
        delivery = WebhookDelivery.objects.select_related("webhook", "event__instance").filter(pk=delivery_id).first()
        if delivery is None:
            return  # its webhook was deleted meanwhile
        code, error, permanent = None, "", False
        try:
            code = self._send(delivery, timeout)
            if not 200 <= code < 300:
                error = f"The receiver answered {code}."
        except PrivateAddress as exc:  # the same every time: no point in retrying
            error, permanent = str(exc), True
        except Unresolvable as exc:
            error = str(exc)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            error = f"Could not reach the receiver ({type(exc).__name__})."
        except Exception as exc:  # counted as a failed attempt, never retried forever
            logger.exception("Webhook delivery %s failed", delivery.pk)
            error = f"Could not send it ({type(exc).__name__})."
        self._record(delivery, code, error, permanent=permanent)

    def _send(self, delivery: WebhookDelivery, timeout: float) -> int:
        body = json.dumps(payload(delivery), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Stockroom-Webhooks/1",
            DELIVERY_HEADER: str(delivery.pk),
            SIGNATURE_HEADER: sign(delivery.webhook.secret, body),
        }
        return self.post(delivery.webhook.url, body, headers, timeout)

    @staticmethod
    def _record(delivery: WebhookDelivery, code: int | None, error: str, *, permanent: bool = False) -> None:
        attempts = delivery.attempts + 1
        changes: dict[str, Any] = {"attempts": attempts, "response_code": code, "error": error}
        if not error:
            changes["status"] = DeliveryStatus.DELIVERED
        elif permanent:
            changes["status"] = DeliveryStatus.FAILED
        elif attempts >= settings.STOCKROOM_WEBHOOK_ATTEMPTS:
            changes["status"] = DeliveryStatus.FAILED
            changes["error"] = f"{error} Gave up after {attempts} attempts."
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
