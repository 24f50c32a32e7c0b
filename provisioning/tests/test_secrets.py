import logging
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from provisioning.models import Instance

from .conftest import wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def database_files() -> tuple[Path, Path]:
    """The folder to search for the portal database's files, and one file that must be among them."""
    if connection.vendor == "sqlite":
        database = Path(settings.DATABASES["default"]["NAME"])
        return database.parent, database
    with connection.cursor() as cursor:  # the test cluster's superuser may read this and write out its pages
        cursor.execute("CHECKPOINT")
        cursor.execute("SHOW data_directory")
        data = Path(cursor.fetchone()[0])
        cursor.execute("SELECT pg_relation_filepath('provisioning_instance')")
        return data, data / cursor.fetchone()[0]


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

    database_folder, database_file = database_files()
    roots = {settings.DATA_DIR, settings.STOCKROOM_INSTANCES_DIR, database_folder}
    files = [path for root in roots for path in root.rglob("*") if path.is_file()]
    assert any(path.name == "users.acl" for path in files)
    assert database_file in files, "the portal's database is searched too"
    for path in files:
        try:
            content = path.read_bytes()
        except FileNotFoundError:  # a running server's scratch file (PostgreSQL's caches) went away meanwhile
            continue
        for secret in secrets:
            assert secret not in content, f"a password is in {path}"
    for secret in secrets:
        assert secret.decode() not in caplog.text

    for kind, pk in created:
        api.delete(f"/api/storage/{kind}/instances/{pk}")
        wait_for_status(api, kind, pk, "gone")
