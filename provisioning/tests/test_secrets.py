import logging

import pytest
from django.conf import settings

from provisioning.models import Instance

from .conftest import wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def test_no_plaintext_password_in_any_file_or_log(api, caplog):
    caplog.set_level(logging.DEBUG)
    created = [
        ("mysql", api.post("/api/storage/mysql/instances", {}).json()["id"]),
        ("redis", api.post("/api/storage/redis/instances", {}).json()["id"]),
    ]
    for kind, pk in created:
        assert wait_for_status(api, kind, pk, "running", "failed")["status"] == "running"
    secrets = [
        secret.encode()
        for instance in Instance.objects.all()
        for secret in (instance.password, instance.admin_password)
    ]
    for kind, pk in created:  # a rotated password must not reach the disk either (e.g. a binary log)
        api.post(f"/api/storage/{kind}/instances/{pk}/rotate-password")
        assert wait_for_status(api, kind, pk, "running", "unhealthy")["status"] == "running"
    secrets += [instance.password.encode() for instance in Instance.objects.all()]
    assert len(set(secrets)) == 6 and all(len(secret) >= 24 for secret in secrets)

    roots = {settings.DATA_DIR, settings.STOCKROOM_INSTANCES_DIR}
    files = [path for root in roots for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "users.acl" for path in files)
    assert any(path.name.startswith("test-portal.sqlite3") for path in files)
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret not in content, f"a password is in {path}"
    for secret in secrets:
        assert secret.decode() not in caplog.text

    for kind, pk in created:
        api.delete(f"/api/storage/{kind}/instances/{pk}")
        wait_for_status(api, kind, pk, "gone")
