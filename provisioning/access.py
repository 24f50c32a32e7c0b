"""Who is signing in, as the sign-in lock-out (django-axes, see settings) sees it (from the same
address as the API's throttles see), and what a locked-out client is told."""

import ipaddress
import math
from datetime import timedelta

from axes.conf import settings as axes_settings  # Django's, with axes' defaults filled in
from axes.helpers import get_cool_off
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from rest_framework.settings import api_settings

LOCKED_OUT_TEMPLATE = "registration/locked_out.html"
USERNAME_LENGTH = 255  # axes' AccessAttempt.username


def client_address(request: HttpRequest) -> str | None:
    """The address a sign-in comes from, as the API's throttles see it: the peer's (REMOTE_ADDR),
    or behind STOCKROOM_TRUSTED_PROXIES proxies that each append the address they saw to
    X-Forwarded-For, the entry that many from its end (any before it came from the client).
    An entry that is not an address counts as the peer's."""
    peer = request.META.get("REMOTE_ADDR")
    proxies = api_settings.NUM_PROXIES or 0
    forwarded = [entry.strip() for entry in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    if not proxies or forwarded == [""]:
        return peer
    try:
        return str(ipaddress.ip_address(forwarded[-min(proxies, len(forwarded))]))
    except ValueError:
        return peer


def client_username(request: HttpRequest, credentials: dict | None = None) -> str | None:
    """The user name a sign-in tries, as axes' default takes it, cut to the 255 characters its table
    holds: no account has a longer one, and a longer one must be counted, not fail the request."""
    field = axes_settings.AXES_USERNAME_FORM_FIELD
    username = credentials.get(field) if credentials else getattr(request, "data", request.POST).get(field)
    return None if username is None else str(username)[:USERNAME_LENGTH]


def locked_out(request: HttpRequest, original_response: HttpResponse | None = None, credentials=None) -> HttpResponse:
    """The answer to a sign-in while its user name or address is locked out: 429, with the time
    to try again (in Retry-After too) or, without a cool-off, the advice to ask an operator."""
    cool_off: timedelta | None = get_cool_off(request)
    context = {
        "failure_limit": settings.AXES_FAILURE_LIMIT,
        "cool_off_minutes": math.ceil(cool_off.total_seconds() / 60) if cool_off else None,
        "until": timezone.now() + cool_off if cool_off else None,
    }
    response = render(request, LOCKED_OUT_TEMPLATE, context, status=429)
    if cool_off:
        response["Retry-After"] = str(int(cool_off.total_seconds()))
    add_never_cache_headers(response)
    return response
