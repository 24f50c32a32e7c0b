"""STOCKROOM_HTTPS: a portal behind a TLS-terminating proxy. Settings are read once per process,
so each case loads them afresh in a child Python with its own environment."""

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

BASE_DIR = settings.BASE_DIR

# Asks for the sign-in page the way the proxy would pass it on, and reports what came back.
PROBE = """
import json, sys
import django
django.setup()
from django.test import Client

extra = json.loads(sys.argv[1])
response = Client().get("/accounts/login/", HTTP_HOST="127.0.0.1", **extra)
print(json.dumps({
    "status": response.status_code,
    "location": response.headers.get("Location", ""),
    "hsts": response.headers.get("Strict-Transport-Security", ""),
    "csrf_cookie_secure": bool(response.cookies["csrftoken"]["secure"]) if "csrftoken" in response.cookies else None,
}))
"""


def get_login_page(https_setting: str | None, **extra: str) -> dict:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "portal.settings", "DATABASE_URL": "sqlite://:memory:"}
    env.pop("STOCKROOM_HTTPS", None)
    if https_setting is not None:
        env["STOCKROOM_HTTPS"] = https_setting
    result = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(extra)],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("https_setting", [None, "False"])
def test_it_serves_plain_http_when_https_is_off(https_setting):
    page = get_login_page(https_setting)
    assert page["status"] == 200
    assert page["hsts"] == ""
    assert page["csrf_cookie_secure"] is False


def test_it_redirects_plain_http_to_https():
    page = get_login_page("True")
    assert page["status"] == 301
    assert page["location"] == "https://127.0.0.1/accounts/login/"


def test_it_trusts_the_proxy_header_and_sends_hsts_and_secure_cookies():
    page = get_login_page("True", HTTP_X_FORWARDED_PROTO="https")
    assert page["status"] == 200
    assert page["hsts"] == "max-age=31536000; includeSubDomains"
    assert page["csrf_cookie_secure"] is True


def test_the_deploy_check_passes_under_production_settings():
    # Browser tests set DJANGO_ALLOW_ASYNC_UNSAFE in this process; a production portal has no such thing.
    env = {
        **{name: value for name, value in os.environ.items() if name != "DJANGO_ALLOW_ASYNC_UNSAFE"},
        "DEBUG": "False",
        "STOCKROOM_HTTPS": "True",
        "SECRET_KEY": os.urandom(48).hex(),
        "DATABASE_URL": "sqlite://:memory:",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
