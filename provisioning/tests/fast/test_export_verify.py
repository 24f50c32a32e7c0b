"""Export and verify of snapshots, over the fake backend: who may, the 4xx answers, where the result
shows, the reconciler's schedule. That a download loads into a plain server, and that verify
catches a damaged snapshot in a real one, is proven in test_export_verify.py (real servers).
"""

import json
from datetime import timedelta

import pytest
from django.core.files.storage import storages
from django.db.models import F
from django.test import Client

from provisioning.backends.base import BackendError
from provisioning.models import Snapshot

from .conftest import reconcile

pytestmark = pytest.mark.django_db


def snapshot_of(api, committed, instance: dict) -> dict:
    with committed():
        response = api.post(f"/api/storage/{instance['kind']}/instances/{instance['id']}/snapshots")
    assert response.status_code == 202, response.content
    return api.get(f"/api/storage/{instance['kind']}/snapshots/{response.json()['id']}").json()


def download(client, kind: str, sid: int):
    return client.get(f"/api/storage/{kind}/snapshots/{sid}/download")


def damage(sid: int) -> None:
    snapshot = Snapshot.objects.get(pk=sid)
    with storages["snapshots"].open(snapshot.file, "wb") as file:
        file.write(b'{"k": "changed on disk"}')


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def admin(django_user_model) -> Client:
    client = Client()
    client.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    return client


def test_a_download_is_the_snapshots_file_as_an_attachment_named_after_the_instance(create, api, committed, fake):
    instance = create("redis", name="cache-1")
    fake.server(instance["id"]).data["k"] = "v"
    snapshot = snapshot_of(api, committed, instance)
    response = download(api, "redis", snapshot["id"])
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="cache-1-snapshot-{snapshot["id"]}.rdb"'
    assert response.streaming  # a FileResponse: read from the file as it is sent
    assert json.loads(b"".join(response.streaming_content)) == {"k": "v"}  # Redis: the stored file itself
    assert fake.called("export_snapshot") == []


def test_a_mysql_download_is_made_by_the_backend_and_named_sql_gz(create, api, committed, fake):
    instance = create("mysql", name="shop")
    fake.server(instance["id"]).data["t"] = "row"
    snapshot = snapshot_of(api, committed, instance)
    response = download(api, "mysql", snapshot["id"])
    assert response.status_code == 200
    assert response["Content-Disposition"] == f'attachment; filename="shop-snapshot-{snapshot["id"]}.sql.gz"'
    assert response["Content-Type"] == "application/gzip"
    assert json.loads(b"".join(response.streaming_content)) == {"t": "row"}
    assert fake.called("export_snapshot") == [None]


def test_a_snapshot_of_a_deleted_instance_can_still_be_downloaded_and_verified(create, act, api, committed, fake):
    instance = create("mysql")
    fake.server(instance["id"]).data["t"] = "kept"
    act(instance, "delete")
    kept = Snapshot.objects.get(instance_id=instance["id"], trigger="before-delete")
    assert json.loads(b"".join(download(api, "mysql", kept.pk).streaming_content)) == {"t": "kept"}
    with committed():
        assert api.post(f"/api/storage/mysql/snapshots/{kept.pk}/verify").status_code == 202
    assert api.get(f"/api/storage/mysql/snapshots/{kept.pk}").json()["verify_status"] == "passed"


def test_a_damaged_or_missing_file_is_not_downloaded(create, api, committed):
    instance = create("redis")
    first, second = snapshot_of(api, committed, instance), snapshot_of(api, committed, instance)
    damage(first["id"])
    response = download(api, "redis", first["id"])
    assert response.status_code == 409
    assert response.json()["detail"] == (
        f"Snapshot {first['id']} cannot be exported: Snapshot {first['id']} is damaged "
        "(its checksum does not match); nothing was exported."
    )
    storages["snapshots"].delete(Snapshot.objects.get(pk=second["id"]).file)
    assert download(api, "redis", second["id"]).status_code == 409


def test_a_snapshot_being_made_is_not_downloaded_or_verified(create, api, committed):
    instance = create("redis")
    response = api.post(f"/api/storage/redis/instances/{instance['id']}/snapshots")  # no worker: still creating
    sid = response.json()["id"]
    assert download(api, "redis", sid).status_code == 409
    refused = api.post(f"/api/storage/redis/snapshots/{sid}/verify")
    assert refused.status_code == 409
    assert refused.json()["detail"] == f"Snapshot {sid} is creating; only a ready snapshot can be verified."


def test_outsiders_and_other_kinds_get_404(create, api, outsider, committed):
    snapshot = snapshot_of(api, committed, create("redis"))
    for client, kind in ((outsider, "redis"), (api, "mysql"), (api, "nosuchkind")):
        assert download(client, kind, snapshot["id"]).status_code == 404
        assert client.post(f"/api/storage/{kind}/snapshots/{snapshot['id']}/verify").status_code == 404
    assert download(api, "redis", 10**6).status_code == 404
    assert Snapshot.objects.get(pk=snapshot["id"]).verify_status == ""


def test_a_verify_passes_and_says_what_it_found_and_when(create, api, committed, fake):
    instance = create("redis")
    fake.server(instance["id"]).data.update(a="1", b="2")
    snapshot = snapshot_of(api, committed, instance)
    assert (snapshot["verify_status"], snapshot["verified_at"]) == ("", None)
    url = f"/api/storage/redis/snapshots/{snapshot['id']}"
    with committed():
        response = api.post(f"{url}/verify")
        assert response.status_code == 202
        assert response.json()["verify_status"] == "verifying"
        assert api.post(f"{url}/verify").status_code == 409  # once at a time
    after = api.get(url).json()
    assert after["verify_status"] == "passed"
    assert after["verify_message"] == "Its checksum matches. It loads: 2 keys."
    assert after["verified_at"] is not None


def test_a_verify_fails_on_a_file_damaged_on_disk_and_on_what_the_server_refuses(create, api, committed, fake):
    instance = create("redis")
    damaged, refused = snapshot_of(api, committed, instance), snapshot_of(api, committed, instance)
    damage(damaged["id"])
    fake.fail_next("verify_snapshot", BackendError("redis-check-rdb failed: the RDB is damaged."))
    with committed():
        api.post(f"/api/storage/redis/snapshots/{damaged['id']}/verify")
        api.post(f"/api/storage/redis/snapshots/{refused['id']}/verify")
    first = api.get(f"/api/storage/redis/snapshots/{damaged['id']}").json()
    assert first["verify_status"] == "failed"
    assert first["verify_message"] == (
        f"Snapshot {damaged['id']} is damaged (its checksum does not match); it cannot be restored."
    )
    second = api.get(f"/api/storage/redis/snapshots/{refused['id']}").json()
    assert (second["verify_status"], second["verify_message"]) == (
        "failed",
        "redis-check-rdb failed: the RDB is damaged.",
    )


def test_the_reconciler_verifies_the_newest_backup_of_each_instance_every_few_days(create, api, committed, settings):
    settings.STOCKROOM_VERIFY_EVERY_DAYS = 7
    instance, other = create("redis"), create("mysql")
    older, newest = snapshot_of(api, committed, instance), snapshot_of(api, committed, instance)
    theirs = snapshot_of(api, committed, other)
    with committed():
        assert reconcile().verifies_queued == 2
    assert Snapshot.objects.get(pk=newest["id"]).verify_status == "passed"
    assert Snapshot.objects.get(pk=theirs["id"]).verify_status == "passed"
    assert Snapshot.objects.get(pk=older["id"]).verify_status == ""
    with committed():
        assert reconcile().verifies_queued == 0
    Snapshot.objects.update(verified_at=F("verified_at") - timedelta(days=6))
    with committed():
        assert reconcile().verifies_queued == 0
    Snapshot.objects.update(verified_at=F("verified_at") - timedelta(days=2))
    with committed():
        assert reconcile().verifies_queued == 2

    settings.STOCKROOM_VERIFY_EVERY_DAYS = 0
    Snapshot.objects.update(verified_at=F("verified_at") - timedelta(days=30))
    with committed():
        assert reconcile().verifies_queued == 0


def test_a_pass_asks_for_few_verifies_and_the_rest_wait_for_the_next(create, api, committed, settings):
    for _ in range(3):
        snapshot_of(api, committed, create("redis"))
    with committed():
        assert reconcile().verifies_queued == 2
    with committed():
        assert reconcile().verifies_queued == 1
    assert set(Snapshot.objects.values_list("verify_status", flat=True)) == {"passed"}


def test_a_verify_whose_worker_died_is_failed_by_the_reconciler(create, api, committed, settings):
    snapshot = snapshot_of(api, committed, create("redis"))
    api.post(f"/api/storage/redis/snapshots/{snapshot['id']}/verify")  # queued after commit: never sent
    settings.STOCKROOM_VERIFY_EVERY_DAYS = 0
    assert reconcile().verifies_failed == 0  # a verify may take as long as a task may run
    limit = settings.STOCKROOM_TASK_TIME_LIMIT + settings.STOCKROOM_STUCK_TIMEOUT
    Snapshot.objects.update(verified_at=F("verified_at") - timedelta(seconds=limit + 1))
    assert reconcile().verifies_failed == 1
    snapshot = Snapshot.objects.get(pk=snapshot["id"])
    assert (snapshot.verify_status, snapshot.verify_message) == (
        "failed",
        "The worker verifying it stopped; try again.",
    )


def test_the_page_offers_download_and_verify_and_shows_the_result(create, api, committed, web, charlie):
    instance = create("redis")
    snapshot = snapshot_of(api, committed, instance)
    page = web.get(f"/instances/{instance['id']}/").content.decode()
    assert f'href="/snapshots/{snapshot["id"]}/download/"' in page
    assert 'data-action="verify"' in page
    with committed():
        assert web.post(f"/snapshots/{snapshot['id']}/verify/").status_code == 302
    page = web.get(f"/instances/{instance['id']}/").content.decode()
    assert 'class="badge passed"' in page and "It loads: 0 keys." in page
    got = web.get(f"/snapshots/{snapshot['id']}/download/")
    assert got.status_code == 200 and got["Content-Disposition"].startswith("attachment;")
    # Another user's snapshot does not exist for charlie's pages either.
    theirs = Client()
    theirs.force_login(charlie)
    assert theirs.get(f"/snapshots/{snapshot['id']}/download/").status_code == 404
    assert theirs.post(f"/snapshots/{snapshot['id']}/verify/").status_code == 404


def test_the_admin_lists_the_verify_result_downloads_and_verifies(create, api, committed, admin):
    snapshot = snapshot_of(api, committed, create("redis"))
    listing = admin.get("/admin/provisioning/snapshot/").content.decode()
    assert f'href="/admin/provisioning/snapshot/{snapshot["id"]}/download/"' in listing
    got = admin.get(f"/admin/provisioning/snapshot/{snapshot['id']}/download/")
    assert got.status_code == 200 and got["Content-Disposition"].startswith("attachment;")
    with committed():
        admin.post(
            "/admin/provisioning/snapshot/",
            {"action": "verify_snapshots", "_selected_action": [snapshot["id"]]},
        )
    assert Snapshot.objects.get(pk=snapshot["id"]).verify_status == "passed"
