"""API tokens: issue one (its secret is returned once and never stored), list, revoke.

The API (`/api/auth/token`, `/api/auth/tokens`), the token page and the admin all come here.
"""

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.utils import timezone

from ..durations import NEVER, RULE, describe_duration, parse_duration
from ..models import AccessToken

logger = logging.getLogger(__name__)

NAME_MAX = 100
# What the compatibility endpoint, POST /api/auth/token, names the token it issues on each call.
LOGIN_TOKEN_NAME = "api-token"


def expiry_rule() -> str:
    """What `expires_in` accepts here, for error messages and help texts."""
    return RULE if settings.STOCKROOM_TOKEN_ALLOW_NEVER else RULE.replace(f", or {NEVER}", "")


def parse_expires_in(value: Any) -> timedelta | None:
    """The lifetime asked for; None (the default) gives STOCKROOM_TOKEN_TTL. "never" only when
    STOCKROOM_TOKEN_ALLOW_NEVER is on. ValidationError naming `expires_in` otherwise."""
    if value is None or value == "":
        ttl: timedelta = settings.STOCKROOM_TOKEN_TTL
        return ttl
    try:
        duration = parse_duration(value)
    except ValueError as exc:
        raise ValidationError({"expires_in": str(exc)}) from None
    if settings.STOCKROOM_TOKEN_ALLOW_NEVER:
        return duration
    if duration is None:
        raise ValidationError(
            {"expires_in": f"Tokens that never expire are not allowed on this portal; give {expiry_rule()}."}
        )
    if duration > settings.STOCKROOM_TOKEN_MAX_TTL:
        longest = describe_duration(settings.STOCKROOM_TOKEN_MAX_TTL)
        raise ValidationError({"expires_in": f"Tokens live at most {longest} on this portal; give a shorter lifetime."})
    return duration


def create_token(*, owner: AbstractBaseUser, name: str, expires_in: Any = None) -> tuple[AccessToken, str]:
    """A new token for `owner`, and its secret: the only time the secret exists outside the client.

    Tokens of the owner that have expired are removed on the way; they could never work again.
    """
    name = (name or "").strip()
    if not name or len(name) > NAME_MAX:
        raise ValidationError({"name": f"Give the token a name of 1 to {NAME_MAX} characters."})
    lifetime = parse_expires_in(expires_in)
    AccessToken.objects.filter(user=owner, expiry__lte=timezone.now()).delete()
    token, secret = AccessToken.objects.create(owner, expiry=lifetime, name=name)
    logger.info("Token %s (%r) issued to %s, expiring %s", token.pk, name, owner, token.expiry or NEVER)
    return token, secret


def tokens_of(owner: AbstractBaseUser) -> QuerySet[AccessToken]:
    """The owner's tokens, newest first (expired ones too, until revoked or replaced)."""
    mine: QuerySet[AccessToken] = AccessToken.objects.filter(user=owner).defer("digest")
    return mine


def revoke_token(*, token: AccessToken, by: AbstractBaseUser) -> None:
    """The token stops working at once: the next request that sends it gets 401."""
    pk = token.pk
    token.delete()
    logger.info("Token %s (%r) of user %s revoked by %s", pk, token.name, token.user_id, by)
