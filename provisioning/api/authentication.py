"""`Authorization: Token <secret>`: django-rest-knox's check (SHA-512 digest, compared in constant
time), over provisioning.AccessToken, with two changes:

- an expired token is refused without touching the owner's other tokens (knox would load them all
  on every request: one query more for each API call);
- `last_used` is written at most once per `last_used_every`, so a busy client costs no extra write;
- a token that is not text (knox would fail decoding it: a 500) is refused like any wrong token.
"""

from datetime import timedelta

from django.utils import timezone
from knox import auth
from rest_framework import exceptions

from ..models import AccessToken


class TokenAuthentication(auth.TokenAuthentication):
    clock = staticmethod(timezone.now)
    last_used_every = timedelta(minutes=1)

    def authenticate_credentials(self, token: bytes):
        try:
            token.decode("utf-8")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("Invalid token.") from None
        return super().authenticate_credentials(token)

    def _cleanup_token(self, auth_token: AccessToken) -> bool:
        """True (skip this row) if the token has expired. It stays listed, marked expired, until revoked."""
        return auth_token.expiry is not None and auth_token.expiry <= self.clock()

    def validate_user(self, auth_token: AccessToken):
        if not auth_token.user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        now = self.clock()
        if auth_token.last_used is None or now - auth_token.last_used >= self.last_used_every:
            # Conditional, so two workers serving the same token in the same instant write once.
            stale = AccessToken.objects.filter(pk=auth_token.pk, last_used=auth_token.last_used)
            stale.update(last_used=now)
            auth_token.last_used = now
        return auth_token.user, auth_token
