"""Throttles of the token endpoints (README, "Tokens"). Every attempt counts, right or wrong.

Counts live in the "shared" cache (a table in the portal database), so that every gunicorn worker
sees the same ones; the default cache is per process. Rates are read from settings on each request.
"""

import hashlib
from typing import cast

from django.conf import settings
from django.core.cache import BaseCache, caches
from django.utils.connection import ConnectionProxy
from rest_framework.throttling import SimpleRateThrottle


class SharedRateThrottle(SimpleRateThrottle):
    cache = cast(BaseCache, ConnectionProxy(caches, "shared"))
    rate_setting = ""  # the name of the setting that holds "N/period"

    def get_rate(self) -> str:
        return getattr(settings, self.rate_setting)

    def _cache_key(self, ident: str) -> str:
        digest = hashlib.sha256(ident.encode()).hexdigest()[:32]  # any user name fits a cache key
        return self.cache_format % {"scope": self.scope, "ident": digest}


class LoginAddressThrottle(SharedRateThrottle):
    """Attempts to obtain a token from one address (REMOTE_ADDR; see NUM_PROXIES)."""

    scope = "token-login-address"
    rate_setting = "STOCKROOM_TOKEN_RATE_ADDRESS"

    def get_cache_key(self, request, view):
        return self._cache_key(self.get_ident(request) or "")  # no address at all: one count for all such


class LoginUsernameThrottle(SharedRateThrottle):
    """Attempts to obtain a token for one user name, from anywhere: a spread-out guesser is slowed too."""

    scope = "token-login-username"
    rate_setting = "STOCKROOM_TOKEN_RATE_USERNAME"

    def get_cache_key(self, request, view):
        username = request.data.get("username") if hasattr(request.data, "get") else None
        if not isinstance(username, str) or not username:
            return None  # nothing to guess at; the address throttle still counts it
        return self._cache_key(username.strip().casefold())


class TokenCreateThrottle(SharedRateThrottle):
    """New tokens made by one signed-in user (POST /api/auth/tokens); listing and revoking are free."""

    scope = "token-create"
    rate_setting = "STOCKROOM_TOKEN_RATE_CREATE"

    def allow_request(self, request, view):
        if request.method != "POST":
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request, view):
        return self._cache_key(str(request.user.pk))
