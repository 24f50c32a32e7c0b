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
from datetime import timedelta
from urllib.parse import urlsplit

import requests
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import transaction
from django.utils import timezone

from .models import DeliveryStatus, Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Stockroom-Signature"
DELIVERY_HEADER = "X-Stockroom-Delivery"
URL_RULE = "an http:// or https:// URL"


class TooManyWebhooks(Exception):
    pass


class PrivateAddress(Exception):
    """The URL leads to an address inside the portal's own network."""


def check_address(host: str) -> None:
    """Refuse hosts that are (or resolve to) loopback, private, link-local or other non-public
    addresses, unless STOCKROOM_WEBHOOK_ALLOW_PRIVATE: a webhook must not become a way to
    probe the portal's network or its instances. Checked at registration and before each send.
    """
    if settings.STOCKROOM_WEBHOOK_ALLOW_PRIVATE:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return  # unresolvable: sending fails with a clear error of its own
    for address in sorted(addresses):
        if not ipaddress.ip_address(address.split("%")[0]).is_global:
            raise PrivateAddress(
                f"{host} is a non-public address ({address}); webhooks may only reach public addresses."
            )


def create_webhook(*, owner, url: str) -> tuple[Webhook, str]:
    """Register `url` for `owner`; returns the webhook and its signing secret (shown only now).

    Raises ValidationError for a URL that is not http(s), TooManyWebhooks past the limit.
    """
    try:
        URLValidator(schemes=["http", "https"])(url)
        host = urlsplit(url).hostname
        urlsplit(url).port  # noqa: B018 - raises ValueError outside 0-65535
    except (ValidationError, ValueError):
        raise ValidationError({"url": f"{url!r} is not {URL_RULE}."}) from None
    try:
        check_address(host)
    except PrivateAddress as exc:
        raise ValidationError({"url": str(exc)}) from None
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


def payload(delivery: WebhookDelivery) -> dict:
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
    return settings.STOCKROOM_WEBHOOK_BACKOFF * 2 ** (attempt - 1)


class Sender:
    """Sends one delivery. `post` is a class attribute so tests can swap the HTTP client."""

    post = staticmethod(requests.post)

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
        except requests.RequestException as exc:
            error = f"Could not reach the receiver ({type(exc).__name__})."
        except Exception as exc:  # noqa: BLE001 - counted as a failed attempt, never retried forever
            logger.exception("Webhook delivery %s failed", delivery.pk)
            error = f"Could not send it ({type(exc).__name__})."
        self._record(delivery, code, error, permanent=permanent)

    def _send(self, delivery: WebhookDelivery, timeout: float) -> int:
        check_address(urlsplit(delivery.webhook.url).hostname)
        body = json.dumps(payload(delivery), separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Stockroom-Webhooks/1",
            DELIVERY_HEADER: str(delivery.pk),
            SIGNATURE_HEADER: sign(delivery.webhook.secret, body),
        }
        response = self.post(delivery.webhook.url, data=body, headers=headers, timeout=timeout, allow_redirects=False)
        return response.status_code

    @staticmethod
    def _record(delivery: WebhookDelivery, code: int | None, error: str, *, permanent: bool = False) -> None:
        attempts = delivery.attempts + 1
        changes = {"attempts": attempts, "response_code": code, "error": error}
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
            from .tasks import deliver_webhook

            deliver_webhook.apply_async((delivery.pk,), countdown=delay)


def queue(delivery_ids: list[int]) -> None:
    """Hand deliveries to the worker. If the broker is down they stay pending, and the
    reconciler's sweep sends them later: a status change must never fail for a webhook."""
    from .tasks import deliver_webhook

    try:
        for pk in delivery_ids:
            deliver_webhook.delay(pk)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.warning("Could not queue webhook deliveries %s (%s); they are sent later", delivery_ids, exc)


def due_deliveries(now) -> list[int]:
    """Pending deliveries whose time has come; the reconciler re-queues any a lost task left behind."""
    return list(
        WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING, next_attempt_at__lte=now).values_list(
            "pk", flat=True
        )[:1000]
    )
