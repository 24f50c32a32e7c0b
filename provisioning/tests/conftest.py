"""Personas and helpers. alice owns instances, charlie is an outsider."""

import shutil
import socket
import time

import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from provisioning.backends.local import kill_processes_under


def client_for(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.get_or_create(user=user)[0].key}")
    return client


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", password="correct-horse-battery")


@pytest.fixture
def charlie(django_user_model):
    return django_user_model.objects.create_user("charlie", password="charlie-staple-42")


@pytest.fixture
def api(alice) -> APIClient:
    return client_for(alice)


@pytest.fixture
def outsider(charlie) -> APIClient:
    return client_for(charlie)


def wait_for_status(api: APIClient, kind: str, pk: int, *wanted: str, timeout: float = 60) -> dict:
    """Poll the API until the instance reaches one of `wanted` (or 404 for "gone")."""
    deadline = time.monotonic() + timeout
    while True:
        response = api.get(f"/api/storage/{kind}/instances/{pk}")
        if response.status_code == 404 and "gone" in wanted:
            return {}
        body = response.json()
        if body.get("status") in wanted:
            return body
        assert time.monotonic() < deadline, f"still {body} after {timeout} s"
        time.sleep(0.05)


def port_refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def instance_dir(kind: str, pk: int):
    return settings.DATA_DIR / "instances" / kind / str(pk)


@pytest.fixture(scope="session", autouse=True)
def stop_leftover_servers():
    """Whatever a failing test left running is stopped at the end, so CI leaves nothing behind."""
    yield
    root = settings.DATA_DIR / "instances"
    if root.exists():
        kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def queued_for_real():
    """Send tasks to the broker instead of running them in the test process."""
    from portal.celery import app

    app.conf.task_always_eager = False
    yield app
    app.conf.task_always_eager = True


def broker_port() -> int:
    return int(settings.CELERY_BROKER_URL.rsplit(":", 1)[1].split("/")[0])
