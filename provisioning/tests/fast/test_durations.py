"""Durations as STOCKROOM_TOKEN_TTL, the token API and the token page read them."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
from django.conf import settings

from provisioning.durations import describe_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(days=90)),
        (90, timedelta(days=90)),
        (" 30d ", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("2W", timedelta(weeks=2)),
        ("45m", timedelta(minutes=45)),
        ("1s", timedelta(seconds=1)),
        ("never", None),
        ("Never", None),
        ("3650d", timedelta(days=3650)),
    ],
)
def test_it_reads_days_durations_and_never(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0d", "-1", "1.5", "3651", "10y", "d", "12 hours", True, None, 1.5, []])
def test_it_rejects_anything_else_saying_what_is_allowed(text):
    with pytest.raises(ValueError, match="never"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["90d", "2w", "12h", "45m", "61s", "never"])
def test_a_description_reads_back(text):
    assert describe_duration(parse_duration(text)) == text


def check_with(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=settings.BASE_DIR,
        env=os.environ | {"DATABASE_URL": "sqlite://:memory:"} | env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("STOCKROOM_TOKEN_TTL", "soon"),
        ("STOCKROOM_TOKEN_TTL", "never"),
        ("STOCKROOM_TOKEN_MAX_TTL", "never"),
        ("STOCKROOM_TOKEN_MAX_TTL", "30d"),  # shorter than the default lifetime
        ("STOCKROOM_TOKEN_RATE_ADDRESS", "10/fortnight"),
        ("STOCKROOM_TOKEN_RATE_USERNAME", "0/minute"),
    ],
)
def test_a_bad_token_setting_stops_the_portal_at_start(name, value):
    result = check_with(**{name: value})
    assert result.returncode != 0
    assert f"{name}" in result.stderr and "ImproperlyConfigured" in result.stderr


def test_good_token_settings_start():
    result = check_with(STOCKROOM_TOKEN_TTL="30d", STOCKROOM_TOKEN_RATE_ADDRESS="100/hour")
    assert result.returncode == 0, result.stderr
