"""Scheduled backups, their pruning and outcomes, and snapshot bookkeeping, over the fake backend.

That a snapshot really holds the data is proven against real servers in test_snapshots.py.
"""

import errno
from datetime import timedelta
from pathlib import Path

import pytest
from django.core.files.storage import FileSystemStorage, storages
from django.db.models import F

from provisioning.backends.base import BackendError
from provisioning.models import Instance, Snapshot, WebhookDelivery
from provisioning.services.webhooks import create_webhook, payload

from .conftest import reconcile

pytestmark = pytest.mark.django_db

HOUR = 3600


def scheduled(pk: int) -> list[Snapshot]:
    return list(Snapshot.objects.filter(instance_id=pk, trigger="scheduled"))


def age(hours: float) -> None:
    """Let `hours` pass for every instance and snapshot (their times move back)."""
    for model in (Instance, Snapshot):
        model.objects.update(created_at=F("created_at") - timedelta(hours=hours))


def test_backups_are_taken_by_the_reconcilers_pass_when_due_and_the_oldest_pruned(create, committed, fake, alice):
    instance = create("redis", backup_interval_hours=2, backup_retention=2)
    pk = instance["id"]
    fake.server(pk).data["k"] = "v"
    off = create("redis", backup_interval_hours=0)

    age(0.1)
    with committed():
        reconcile()
    assert scheduled(pk) == []  # not due yet: the first is ten minutes after the create

    for _ in range(3):
        age(2.1)
        with committed():
            assert reconcile().backups_requested == 1
        # A pass asks once: the next is due an interval after this one.
        with committed():
            assert reconcile().backups_requested == 0
    kept = scheduled(pk)
    assert [snapshot.status for snapshot in kept] == ["ready", "ready"]  # the oldest of three was pruned
    assert all(storages["snapshots"].exists(snapshot.file) for snapshot in kept)
    assert Snapshot.objects.filter(instance_id=off["id"]).count() == 0

    events = Instance.objects.get(pk=pk).events.filter(type="instance.backup_completed")
    assert events.count() == 3
    assert events.first().from_status == events.first().to_status == "running"


def test_the_first_backup_is_due_soon_after_the_create_so_the_recovery_window_begins(create, committed, api):
    pk = create("redis", backup_interval_hours=24)["id"]
    assert api.get(f"/api/storage/redis/instances/{pk}").json()["recovery_window"] is None
    age(0.15)  # nine minutes
    with committed():
        assert reconcile().backups_requested == 0
    age(0.03)
    with committed():
        assert reconcile().backups_requested == 1
    [first] = scheduled(pk)
    assert first.status == "ready" and first.log_start  # a base: the window begins the second after it
    age(23.5)  # then a day after that one
    with committed():
        assert reconcile().backups_requested == 0


def test_an_interval_shorter_than_the_first_backup_delay_comes_first(create, committed, settings):
    settings.STOCKROOM_FIRST_BACKUP_AFTER = 2 * HOUR
    pk = create("redis", backup_interval_hours=1)["id"]
    age(0.9)
    with committed():
        assert reconcile().backups_requested == 0
    age(0.2)
    with committed():
        assert reconcile().backups_requested == 1
    assert len(scheduled(pk)) == 1


def test_a_backup_outcome_reaches_webhooks_with_its_own_type(create, committed, fake, alice):
    create_webhook(owner=alice, url="https://hooks.example.com/x")
    instance = create("redis", backup_interval_hours=1)
    fake.fail_next("snapshot", BackendError("The disk is full."))
    age(1.1)
    with committed():
        reconcile()
    failed = scheduled(instance["id"])[0]
    assert failed.status == "failed"
    assert failed.status_message == "The snapshot failed: The disk is full."
    types = [payload(delivery)["type"] for delivery in WebhookDelivery.objects.order_by("id")]
    assert types[-1] == "instance.backup_failed"
    assert "instance.status_changed" in types


def test_a_backup_over_the_snapshot_quota_fails_once_per_interval(create, committed, settings, alice):
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = 0
    instance = create("redis", backup_interval_hours=1)
    age(1.1)
    with committed():
        reconcile()
        reconcile()
    [failed] = scheduled(instance["id"])
    assert failed.status == "failed" and "snapshot quota" in failed.status_message


def test_a_snapshot_over_the_quota_is_refused_with_403(create, api, settings):
    instance = create("redis")
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = 0
    response = api.post(f"/api/storage/redis/instances/{instance['id']}/snapshots")
    assert response.status_code == 403
    assert "snapshot quota" in response.json()["detail"]


def test_an_expired_before_delete_snapshot_is_removed(create, act, settings):
    instance = create("redis")
    assert act(instance, "delete") == {"status": "gone"}
    kept = Snapshot.objects.get(instance_id=instance["id"], trigger="before-delete")
    assert storages["snapshots"].exists(kept.file)
    reconcile(later=settings.STOCKROOM_SNAPSHOT_KEEP_DAYS * 24 * HOUR - 60)
    assert Snapshot.objects.filter(pk=kept.pk).exists()
    reconcile(later=settings.STOCKROOM_SNAPSHOT_KEEP_DAYS * 24 * HOUR + 60)
    assert not Snapshot.objects.filter(pk=kept.pk).exists()
    assert not storages["snapshots"].exists(kept.file)


def test_a_snapshot_whose_worker_died_is_marked_failed_and_the_instance_untouched(create, api, settings):
    instance = create("redis")
    # Requested, but its job never ran (the worker died with it).
    response = api.post(f"/api/storage/redis/instances/{instance['id']}/snapshots")
    sid = response.json()["id"]
    reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT - 5)
    assert Snapshot.objects.get(pk=sid).status == "creating"
    reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 5)
    assert Snapshot.objects.get(pk=sid).status == "failed"
    assert Instance.objects.get(pk=instance["id"]).status == "running"


def own_snapshot_folder(settings, folder: Path) -> None:
    """Snapshots of this test only, in `folder`, to see what is left there."""
    snapshots = {**settings.STORAGES["snapshots"], "OPTIONS": {"location": folder}}
    settings.STORAGES = settings.STORAGES | {"snapshots": snapshots}


def snapshot_now(api, committed, instance: dict) -> dict:
    with committed():
        response = api.post(f"/api/storage/{instance['kind']}/instances/{instance['id']}/snapshots")
    assert response.status_code == 202, response.content
    return api.get(f"/api/storage/{instance['kind']}/snapshots/{response.json()['id']}").json()


def test_a_restore_puts_the_snapshots_data_back_and_keeps_the_password(create, api, committed, fake):
    instance = create("redis")
    fake.server(instance["id"]).data["k"] = "before"
    snapshot = snapshot_now(api, committed, instance)
    assert snapshot["status"] == "ready" and snapshot["checksum"].startswith("sha256:")
    fake.server(instance["id"]).data["k"] = "after"
    url = f"/api/storage/redis/instances/{instance['id']}"
    with committed():
        response = api.post(f"{url}/restore", {"snapshot": snapshot["id"]}, format="json")
        assert response.json()["status"] == "restoring"
        # Busy: another restore, a snapshot, or deleting the snapshot being restored, is 409.
        assert api.post(f"{url}/restore", {"snapshot": snapshot["id"]}, format="json").status_code == 409
        assert api.post(f"{url}/snapshots").status_code == 409
        assert api.delete(f"/api/storage/redis/snapshots/{snapshot['id']}").status_code == 409
    after = api.get(url).json()
    assert after["status"] == "running"
    assert after["status_message"].startswith(f"Restored snapshot {snapshot['id']} of ")
    assert fake.server(instance["id"]).data == {"k": "before"}
    assert Instance.objects.get(pk=instance["id"]).restore_from is None


def test_a_failed_restore_leaves_the_instance_to_the_reconciler(create, api, committed, fake):
    instance = create("redis")
    snapshot = snapshot_now(api, committed, instance)
    fake.fail_next("restore", BackendError("mbstream failed: no space left on device"))
    with committed():
        api.post(f"/api/storage/redis/instances/{instance['id']}/restore", {"snapshot": snapshot["id"]}, format="json")
    after = api.get(f"/api/storage/redis/instances/{instance['id']}").json()
    assert after["status"] == "unhealthy"
    assert after["status_message"] == "Restore failed: mbstream failed: no space left on device"


def test_a_restore_whose_worker_died_is_done_again_by_the_recovery(create, api, committed, fake, settings):
    instance = create("redis")
    fake.server(instance["id"]).data["k"] = "snapshot"
    snapshot = snapshot_now(api, committed, instance)
    fake.server(instance["id"]).data["k"] = "later"
    # Requested, and its job lost with a dead worker: the instance stays restoring.
    api.post(f"/api/storage/redis/instances/{instance['id']}/restore", {"snapshot": snapshot["id"]}, format="json")
    assert Instance.objects.get(pk=instance["id"]).status == "restoring"
    with committed():
        reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + settings.STOCKROOM_CLAIM_SECONDS + 5)
    assert Instance.objects.get(pk=instance["id"]).status == "running"
    assert fake.server(instance["id"]).data == {"k": "snapshot"}


def test_a_clone_of_a_snapshot_of_another_kind_or_not_ready_is_refused(create, api, committed):
    instance = create("redis")
    snapshot = snapshot_now(api, committed, instance)
    assert api.post("/api/storage/mysql/instances", {"from_snapshot": snapshot["id"]}, format="json").status_code == 404
    Snapshot.objects.filter(pk=snapshot["id"]).update(status="failed")
    response = api.post("/api/storage/redis/instances", {"from_snapshot": snapshot["id"]}, format="json")
    assert response.status_code == 400
    assert response.json() == {"from_snapshot": [f"Snapshot {snapshot['id']} is failed, not ready."]}


def test_a_delete_of_a_server_that_does_not_answer_keeps_nothing_and_goes_on(create, act, fake):
    instance = create("redis")
    fake.kill(instance["id"])
    assert act(instance, "delete") == {"status": "gone"}
    gone = Instance.objects.get(pk=instance["id"])
    assert gone.status_message.endswith("It was not running, so no snapshot of its data was kept.")
    assert not Snapshot.objects.filter(instance=gone).exists()


def test_a_before_delete_snapshot_that_fails_leaves_no_row_and_the_delete_goes_on(create, act, fake):
    instance = create("redis")
    fake.fail_next("snapshot", BackendError("The disk is full."))
    assert act(instance, "delete") == {"status": "gone"}
    gone = Instance.objects.get(pk=instance["id"])
    assert "No snapshot of its data could be kept (The snapshot failed: The disk is full.)." in gone.status_message
    assert not Snapshot.objects.filter(instance=gone).exists()


def test_snapshots_being_made_count_toward_the_quota_at_their_instances_disk_size(create, api, committed, settings):
    instance = create("redis")
    url = f"/api/storage/redis/instances/{instance['id']}/snapshots"
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = Instance.objects.get(pk=instance["id"]).disk_limit
    # Asked twice before a worker takes either: the first may take the whole quota, so the second
    # is refused instead of both passing it together.
    assert api.post(url).status_code == 202
    response = api.post(url)
    assert response.status_code == 403 and "with those being made" in response.json()["detail"]


def test_a_copy_that_passes_what_is_left_of_the_quota_is_cut_off_and_leaves_no_file(
    create, api, committed, fake, settings, tmp_path
):
    own_snapshot_folder(settings, tmp_path)
    instance = create("redis")
    fake.server(instance["id"]).data["k"] = "x" * 5000
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = 1000
    snapshot = snapshot_now(api, committed, instance)
    assert snapshot["status"] == "failed"
    assert snapshot["status_message"] == (
        "The snapshot failed: The copy passed what is left of your snapshot quota (1000 bytes)."
    )
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []
    assert api.get(f"/api/storage/redis/instances/{instance['id']}").json()["status"] == "running"


def test_a_before_delete_snapshot_is_bound_by_the_quota_too(create, act, settings):
    instance = create("redis")
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = 0
    assert act(instance, "delete") == {"status": "gone"}
    gone = Instance.objects.get(pk=instance["id"])
    assert "No snapshot of its data could be kept" in gone.status_message and "snapshot quota" in gone.status_message
    assert not Snapshot.objects.filter(instance=gone).exists()


def test_a_failed_clone_holds_its_snapshot_no_more(create, api, committed, fake):
    instance = create("redis")
    snapshot = snapshot_now(api, committed, instance)
    fake.fail_next("restore", BackendError("mbstream failed: no space left on device"))
    with committed():
        clone = api.post("/api/storage/redis/instances", {"from_snapshot": snapshot["id"]}, format="json").json()
    assert api.get(f"/api/storage/redis/instances/{clone['id']}").json()["status"] == "failed"
    assert api.delete(f"/api/storage/redis/snapshots/{snapshot['id']}").status_code == 204


def test_an_instance_filter_beyond_any_id_finds_nothing(api):
    response = api.get("/api/storage/redis/snapshots", {"instance": "9" * 30})
    assert response.status_code == 200 and response.json()["results"] == []


def test_a_save_cut_short_by_a_full_disk_leaves_no_part_of_the_file(
    create, api, committed, settings, tmp_path, monkeypatch
):
    own_snapshot_folder(settings, tmp_path)
    instance = create("redis")

    def full_disk(storage, name, content):  # writes a part, as FileSystemStorage does before ENOSPC
        path = Path(storage.path(name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemStorage, "_save", full_disk)
    snapshot = snapshot_now(api, committed, instance)
    assert snapshot["status"] == "failed"
    assert [path for path in tmp_path.rglob("*") if path.is_file()] == []


def test_the_bases_restores_take_are_pruned_with_the_scheduled_and_manual_snapshots_never(create, committed, api, fake):
    instance = create("redis", backup_interval_hours=1, backup_retention=2)
    pk = instance["id"]
    fake.server(pk).data["k"] = "v"
    with committed():
        manual = api.post(f"/api/storage/redis/instances/{pk}/snapshots").json()["id"]
    for _ in range(2):
        age(1.1)
        with committed():
            reconcile()
        age(0.1)
        with committed():
            response = api.post(f"/api/storage/redis/instances/{pk}/restore", {"snapshot": manual}, format="json")
        assert response.status_code == 202, response.content
    with committed():
        reconcile()

    automatic = Snapshot.objects.filter(instance_id=pk).exclude(trigger="manual")
    # Scheduled, after-restore, scheduled, after-restore: the newest two are kept.
    assert [snapshot.trigger for snapshot in automatic] == ["after-restore", "scheduled"]
    assert Snapshot.objects.filter(instance_id=pk).count() == 3
    assert Snapshot.objects.filter(pk=manual, status="ready").exists()
