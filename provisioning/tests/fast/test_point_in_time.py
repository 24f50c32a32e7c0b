"""Point-in-time recovery's bookkeeping over the fake backend: the window, timelines, the archive
schedule and pruning, and failures. That a restore to a time holds exactly the writes before it is
proven against real servers in test_point_in_time.py.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.core.files.storage import storages
from django.db.models import F
from django.test import Client
from django.utils import timezone

from provisioning.backends.base import BackendError
from provisioning.models import Instance, LogFile, Snapshot
from provisioning.services import logs

from .conftest import reconcile

pytestmark = pytest.mark.django_db

MINUTE = 60


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def ago(minutes: float) -> datetime:
    return (timezone.now() - timedelta(minutes=minutes)).replace(microsecond=0)


@pytest.fixture
def based(create, committed, api, fake):
    """A running redis instance with a base snapshot an hour old, and writes at 50, 40, 30 and 20
    minutes ago (k1…k4), archived."""
    instance = create("redis")
    pk = instance["id"]
    with committed():
        assert api.post(f"/api/storage/redis/instances/{pk}/snapshots").status_code == 202
    Snapshot.objects.filter(instance_id=pk).update(finished_at=F("finished_at") - timedelta(hours=1))
    for n, minutes in enumerate((50, 40, 30, 20), start=1):
        fake.server(pk).write(f"k{n}", n, at=ago(minutes).timestamp())
    logs.archive(pk)
    return instance


def restore_to(api, committed, pk: int, moment: datetime, *, expect: int = 202):
    with committed():
        response = api.post(f"/api/storage/redis/instances/{pk}/restore", {"time": iso(moment)}, format="json")
    assert response.status_code == expect, response.content
    return response


def test_the_window_begins_with_the_first_base_and_ends_now_while_it_runs(create, committed, api):
    pk = create("redis")["id"]
    assert api.get(f"/api/storage/redis/instances/{pk}").json()["recovery_window"] is None
    with committed():
        api.post(f"/api/storage/redis/instances/{pk}/snapshots")
    base = Snapshot.objects.get(instance_id=pk)
    Snapshot.objects.filter(pk=base.pk).update(finished_at=datetime(2026, 1, 1, 12, 0, 0, 250000, tzinfo=UTC))
    window = api.get(f"/api/storage/redis/instances/{pk}").json()["recovery_window"]
    assert window["from"] == "2026-01-01T12:00:01Z"  # the whole second after the base was done
    assert window["to"] == iso(timezone.now())


def test_a_restore_to_a_time_replays_exactly_the_writes_before_it_on_a_new_timeline(based, api, committed, fake):
    pk = based["id"]
    restore_to(api, committed, pk, ago(35))
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running", instance.status_message
    assert fake.server(pk).data == {"k1": 1, "k2": 2}
    assert instance.timeline == 2 and instance.restore_until is None and instance.restore_from is None
    # The new timeline's first base is taken before it runs again; the old one's are not its bases.
    base = Snapshot.objects.get(instance_id=pk, trigger="after-restore")
    assert base.timeline == 2 and base.status == "ready"
    assert list(logs.bases(instance)) == [base]
    Snapshot.objects.filter(pk=base.pk).update(finished_at=ago(1))
    window = api.get(f"/api/storage/redis/instances/{pk}").json()["recovery_window"]
    assert window["from"] == iso(ago(1))
    # An hour ago is on the old timeline now: outside the window.
    response = restore_to(api, committed, pk, ago(45), expect=400)
    assert "outside" in response.json()["time"][0]


def test_a_time_outside_the_window_is_400_naming_it_and_changes_nothing(based, api, committed):
    pk = based["id"]
    window = api.get(f"/api/storage/redis/instances/{pk}").json()["recovery_window"]
    for moment in (ago(120), timezone.now() + timedelta(minutes=5)):
        response = restore_to(api, committed, pk, moment, expect=400)
        [message] = response.json()["time"]
        assert message.startswith(f"{iso(moment)} is outside instance {pk}'s recovery window, {window['from']} to ")
    assert Instance.objects.get(pk=pk).status == "running"


@pytest.mark.parametrize(
    "body",
    [{"time": "yesterday"}, {"snapshot": 1, "time": "2026-01-01T00:00:00Z"}, {}],
)
def test_a_restore_needs_either_a_snapshot_or_a_time(based, api, body):
    response = api.post(f"/api/storage/redis/instances/{based['id']}/restore", body, format="json")
    assert response.status_code == 400, response.content


def test_a_clone_to_a_time_has_the_writes_before_it_and_new_credentials(based, api, committed, fake):
    pk = based["id"]
    with committed():
        response = api.post("/api/storage/redis/instances", {"from_instance": pk, "time": iso(ago(25))}, format="json")
    assert response.status_code == 202, response.content
    clone = Instance.objects.get(pk=response.json()["id"])
    assert clone.status == "running", clone.status_message
    assert fake.server(clone.pk).data == {"k1": 1, "k2": 2, "k3": 3}
    assert clone.password != Instance.objects.get(pk=pk).password
    assert fake.server(pk).data == {"k1": 1, "k2": 2, "k3": 3, "k4": 4}


def test_a_clone_of_someone_elses_instance_or_outside_its_window_is_refused(based, api, outsider):
    response = outsider.post(
        "/api/storage/redis/instances", {"from_instance": based["id"], "time": iso(ago(25))}, format="json"
    )
    assert response.status_code == 404
    response = api.post(
        "/api/storage/redis/instances", {"from_instance": based["id"], "time": iso(ago(90))}, format="json"
    )
    assert response.status_code == 400 and "outside" in response.json()["time"][0]
    response = api.post("/api/storage/redis/instances", {"from_instance": based["id"]}, format="json")
    assert response.status_code == 400


def test_a_restore_whose_log_cannot_be_archived_restores_nothing(based, api, committed, fake):
    pk = based["id"]
    fake.server(pk).write("k5", 5)
    fake.fail_next("archive_logs", BackendError("disk full"))
    restore_to(api, committed, pk, ago(0))
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "unhealthy"
    assert "disk full" in instance.status_message
    assert fake.server(pk).data["k5"] == 5  # the old data stays


def test_a_damaged_log_file_is_never_replayed(based, api, committed, fake):
    pk = based["id"]
    log = LogFile.objects.get(instance_id=pk)
    with storages["snapshots"].open(log.file, "wb") as file:
        file.write(b'[[0, "k1", "tampered"]]')
    restore_to(api, committed, pk, ago(35))
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "unhealthy"
    assert f"The archived log file {log.name} is damaged" in instance.status_message
    assert fake.server(pk).data == {"k1": 1, "k2": 2, "k3": 3, "k4": 4}  # nothing was restored


def test_a_restore_to_a_time_whose_worker_died_is_redone_from_what_the_first_try_archived(
    based, api, committed, fake, settings
):
    pk = based["id"]
    old_timeline = LogFile.objects.filter(instance_id=pk, timeline=1)
    archived = old_timeline.count()
    # Requested, and its job lost with a dead worker; the server answers, maybe with new data
    # already: its log must not join the old timeline's.
    api.post(f"/api/storage/redis/instances/{pk}/restore", {"time": iso(ago(35))}, format="json")
    assert Instance.objects.get(pk=pk).status == "restoring"
    with committed():
        reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + settings.STOCKROOM_CLAIM_SECONDS + 5)
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running", instance.status_message
    assert fake.server(pk).data == {"k1": 1, "k2": 2}
    assert old_timeline.count() == archived


def test_the_reconciler_archives_when_due_and_prunes_logs_with_their_bases(based, committed, fake, settings):
    pk = based["id"]
    settings.STOCKROOM_LOG_ARCHIVE_INTERVAL = 5 * MINUTE
    with committed():
        assert reconcile().archives_queued == 0  # archived just now
    with committed():
        assert reconcile(later=6 * MINUTE).archives_queued == 1
    assert fake.called("archive_logs").count(pk) == 2
    files = list(LogFile.objects.filter(instance_id=pk))
    assert files and all(storages["snapshots"].exists(log.file) for log in files)

    # Once a later base exists and the first is gone, logs closed before it go with their files.
    Snapshot.objects.filter(instance_id=pk).update(created_at=F("created_at") - timedelta(hours=1))
    fresh = Snapshot.objects.create(
        owner=Instance.objects.get(pk=pk).owner, kind="redis", instance_id=pk, instance_name="x",
        status="ready", file="x", checksum="sha256:0", log_start="9", finished_at=timezone.now(),
    )  # fmt: skip
    Snapshot.objects.exclude(pk=fresh.pk).filter(instance_id=pk).delete()
    with committed():
        assert reconcile().logs_pruned == len(files)
    assert not LogFile.objects.filter(instance_id=pk).exists()
    assert not any(storages["snapshots"].exists(log.file) for log in files)


# The page and the admin: the same services ---------------------------------------------------


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


def test_the_instance_page_shows_the_window_and_restores_or_clones_to_a_picked_time(based, web, committed, fake):
    pk = based["id"]
    page = web.get(f"/instances/{pk}/").content.decode()
    window = logs.recovery_window(Instance.objects.get(pk=pk))
    assert 'id="recovery-window"' in page and f"{window[0]:%Y-%m-%d %H:%M:%S}" in page
    assert f'min="{window[0]:%Y-%m-%dT%H:%M:%S}"' in page and 'type="datetime-local"' in page
    assert 'data-action="restore-to-time"' in page and 'data-action="clone-at-time"' in page

    picked = f"{ago(25):%Y-%m-%dT%H:%M:%S}"  # what the picker sends: no zone, the page says UTC
    with committed():
        response = web.post(f"/instances/{pk}/clone-at-time/", {"time": picked, "name": "as-of"})
    clone = Instance.objects.get(name="as-of")
    assert response["Location"] == f"/instances/{clone.pk}/"
    assert fake.server(clone.pk).data == {"k1": 1, "k2": 2, "k3": 3}

    with committed():
        web.post(f"/instances/{pk}/restore-to-time/", {"time": f"{ago(35):%Y-%m-%dT%H:%M:%S}"})
    assert fake.server(pk).data == {"k1": 1, "k2": 2}
    assert Instance.objects.get(pk=pk).timeline == 2


def test_the_page_refuses_a_bad_or_outside_time_with_a_message_and_outsiders_get_404(based, web, charlie):
    pk = based["id"]
    asked = (
        ("soon", "Give a time as"),
        ("2026-02-30T10:00:00", "Give a time as"),  # no such day
        ("0001-01-01T00:00:00+05:00", "Give a time as"),  # before the first UTC time there is
        (f"{ago(90):%Y-%m-%dT%H:%M:%S}", "outside"),
    )
    for time, said in asked:
        for action in ("restore-to-time", "clone-at-time"):
            response = web.post(f"/instances/{pk}/{action}/", {"time": time}, follow=True)
            assert response.status_code == 200 and said in response.content.decode(), (time, action)
    assert Instance.objects.get(pk=pk).status == "running"
    web.force_login(charlie)
    assert web.post(f"/instances/{pk}/restore-to-time/", {"time": f"{ago(25):%Y-%m-%dT%H:%M:%S}"}).status_code == 404
    assert web.post(f"/instances/{pk}/clone-at-time/", {"time": f"{ago(25):%Y-%m-%dT%H:%M:%S}"}).status_code == 404


def test_the_admin_shows_the_window_and_the_archived_logs(based, django_user_model):
    admin = Client()
    admin.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    page = admin.get(f"/admin/provisioning/instance/{based['id']}/change/").content.decode()
    window = logs.recovery_window(Instance.objects.get(pk=based["id"]))
    assert f"{window[0]:%Y-%m-%d %H:%M:%S} to" in page
    listing = admin.get("/admin/provisioning/logfile/").content.decode()
    assert LogFile.objects.get(instance_id=based["id"]).name in listing


def test_snapshots_and_archived_logs_count_together_in_usage_the_dashboard_and_the_admin(
    based, api, web, django_user_model, settings
):
    snapshot, log = Snapshot.objects.get(instance_id=based["id"]), LogFile.objects.get(instance_id=based["id"])
    assert snapshot.size_bytes > 0 and log.size_bytes > 0
    total = snapshot.size_bytes + log.size_bytes
    usage = api.get("/api/usage").json()
    assert (usage["snapshot_storage"], usage["snapshot_quota"]) == (total, settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES)
    dashboard = " ".join(web.get("/").content.decode().split())
    assert f"Your snapshots and archived logs take {total} bytes of your" in dashboard

    admin = Client()
    admin.force_login(django_user_model.objects.create_superuser("olga", password="operator-pass-1"))
    listing = " ".join(admin.get("/admin/provisioning/snapshot/").content.decode().split())
    assert f"<td>alice</td><td>1</td><td>1</td><td>{total} bytes</td>" in listing

    # And the quota left for the next snapshot is what both leave.
    settings.STOCKROOM_SNAPSHOT_QUOTA_BYTES = total
    response = api.post(f"/api/storage/redis/instances/{based['id']}/snapshots")
    assert response.status_code == 403 and "snapshot quota" in response.json()["detail"]
