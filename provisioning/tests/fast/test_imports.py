"""Imports over the fake backend: the request, the statuses, the undo snapshot, refusals, a load cut
short, a dead worker, the size limit, a clone from a file, outsiders. (A fake server takes a JSON
object of keys; the real engines' files are proven in test_imports.py against real servers.)"""

import json
import shutil
from pathlib import Path

import pytest
from django.core.files.storage import storages
from django.core.files.uploadedfile import SimpleUploadedFile

from provisioning.backends.base import BackendError
from provisioning.models import Instance, InstanceEvent, Snapshot, Status
from provisioning.services import imports
from provisioning.services.state import Side, check_transition

from .conftest import reconcile

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def no_kept_uploads():
    """Each test begins with no uploaded file kept (the store outlives tests)."""
    shutil.rmtree(Path(storages["snapshots"].location) / "imports", ignore_errors=True)


def upload(data: object, name: str = "seed.rdb") -> SimpleUploadedFile:
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    return SimpleUploadedFile(name, body, content_type="application/octet-stream")


@pytest.fixture
def running(create, fake) -> dict:
    instance = create("redis")
    fake.server(instance["id"]).data = {"old": 1}
    return instance


def post_import(api, instance: dict, file) -> object:
    return api.post(
        f"/api/storage/{instance['kind']}/instances/{instance['id']}/import", {"file": file}, format="multipart"
    )


def history(pk: int) -> list[str]:
    return [event.reason for event in InstanceEvent.objects.filter(instance_id=pk)]


def kept_uploads() -> list[str]:
    store = storages["snapshots"]
    if not store.exists("imports/redis"):
        return []
    return store.listdir("imports/redis")[1]


def test_an_import_answers_202_goes_importing_then_running_with_the_data_and_an_undo_snapshot(
    api, running, committed, fake
):
    pk = running["id"]
    with committed():
        response = post_import(api, running, upload({"a": 1, "b": 2}))
        assert response.status_code == 202, response.content
        assert response.json()["status"] == "importing"
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running", instance.status_message
    assert fake.server(pk).data == {"old": 1, "a": 1, "b": 2}
    undo = Snapshot.objects.get(instance_id=pk, trigger="before-import")
    assert undo.status == "ready" and json.loads(storages["snapshots"].open(undo.file).read()) == {"old": 1}
    assert f"Snapshot {undo.pk} (before-import) undoes it" in instance.status_message
    assert instance.import_file == "" and kept_uploads() == []
    assert [e.to_status for e in InstanceEvent.objects.filter(instance_id=pk)][-2:] == ["importing", "running"]


def test_a_file_the_engine_refuses_leaves_the_data_and_says_why(api, running, committed, fake):
    pk = running["id"]
    with committed():
        assert post_import(api, running, upload(b'{"a": 1, "cut', name="x.rdb")).status_code == 202
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running"
    assert instance.status_message.startswith("Import refused: The file is not a JSON object")
    assert "The data is as it was." in instance.status_message
    assert fake.server(pk).data == {"old": 1}
    assert not Snapshot.objects.filter(instance_id=pk, trigger="before-import").exists()
    assert kept_uploads() == []


def test_a_load_cut_short_puts_the_before_import_snapshot_back(api, running, committed, fake):
    pk = running["id"]
    fake.fail_next("import_data", fake_error("the server refused line 3"))
    with committed():
        post_import(api, running, upload({"a": 1, "b": 2, "c": 3, "d": 4}))
    instance = Instance.objects.get(pk=pk)
    undo = Snapshot.objects.get(instance_id=pk, trigger="before-import")
    assert instance.status == "running", instance.status_message
    assert "Import failed: the server refused line 3" in instance.status_message
    assert f"Snapshot {undo.pk}, taken before it, was put back" in instance.status_message
    assert fake.server(pk).data == {"old": 1}
    assert instance.timeline == 2  # the data no longer follows from the old timeline's log


def test_if_putting_the_data_back_fails_too_it_is_unhealthy_naming_the_snapshot(api, running, committed, fake):
    pk = running["id"]
    fake.fail_next("import_data", fake_error("the server refused line 2"))
    fake.fail_next("restore", fake_error("the disk is full"))
    with committed():
        post_import(api, running, upload({"a": 1, "b": 2}))
    instance = Instance.objects.get(pk=pk)
    undo = Snapshot.objects.get(instance_id=pk, trigger="before-import")
    assert instance.status == "unhealthy"
    assert "Putting back snapshot" in instance.status_message and "the disk is full" in instance.status_message
    assert instance.status_message.endswith(f"restore snapshot {undo.pk} to get the data as it was.")
    assert instance.restore_from is None and kept_uploads() == []


def test_an_import_whose_worker_died_mid_load_is_undone_by_the_reconciler(api, running, committed, fake, settings):
    pk = running["id"]
    fake.fail_next("import_data", KeyboardInterrupt())  # the worker goes away with half the keys in
    with pytest.raises(KeyboardInterrupt), committed():
        post_import(api, running, upload({"a": 1, "b": 2, "c": 3, "d": 4}))
    assert Instance.objects.get(pk=pk).status == "importing"
    assert fake.server(pk).data == {"old": 1, "a": 1, "b": 2}
    with committed():
        reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + settings.STOCKROOM_CLAIM_SECONDS + 5)
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running", instance.status_message
    assert "The worker importing the file stopped; the import was given up." in instance.status_message
    assert fake.server(pk).data == {"old": 1}
    assert kept_uploads() == []


def test_an_import_whose_job_was_lost_before_it_began_ends_running_unchanged(api, running, committed, fake, settings):
    pk = running["id"]
    assert post_import(api, running, upload({"a": 1})).status_code == 202  # never committed: no job
    with committed():
        reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + settings.STOCKROOM_CLAIM_SECONDS + 5)
    instance = Instance.objects.get(pk=pk)
    assert instance.status == "running"
    assert "before it loaded anything; the data is as it was" in instance.status_message
    assert fake.server(pk).data == {"old": 1}


def test_a_file_over_the_limit_answers_413_and_changes_nothing(api, running, settings):
    settings.STOCKROOM_IMPORT_MAX_BYTES = 100
    big = upload({"k": "x" * 200})
    response = post_import(api, running, big)
    assert response.status_code == 413
    assert "at most 100 B" in response.json()["detail"] or "STOCKROOM_IMPORT_MAX_BYTES" in response.json()["detail"]
    # A body that says it is too long is answered before it is read.
    url = f"/api/storage/redis/instances/{running['id']}/import"
    response = api.generic("POST", url, b"", content_type="multipart/form-data; boundary=x", CONTENT_LENGTH=10**9)
    assert response.status_code == 413
    assert Instance.objects.get(pk=running["id"]).status == "running"
    assert kept_uploads() == []


@pytest.mark.parametrize(
    ("body", "field_message"),
    [
        ({"file": SimpleUploadedFile("dump.sql", b"{}")}, "is not a file a Redis import takes: a .rdb file"),
        ({"note": "no file"}, "No file was submitted"),
    ],
)
def test_a_wrong_or_missing_file_is_a_400_naming_the_field(api, running, body, field_message):
    response = api.post(f"/api/storage/redis/instances/{running['id']}/import", body, format="multipart")
    assert response.status_code == 400, response.content
    assert field_message in json.dumps(response.json())


def test_an_instance_that_is_not_running_answers_409(api, running, act):
    act(running, "stop")
    response = post_import(api, running, upload({"a": 1}))
    assert response.status_code == 409
    assert kept_uploads() == []


def test_outsiders_get_404(outsider, running):
    assert post_import(outsider, running, upload({"a": 1})).status_code == 404
    assert (
        outsider.post(
            "/api/storage/redis/instances/999999/import", {"file": upload({})}, format="multipart"
        ).status_code
        == 404
    )
    assert Instance.objects.get(pk=running["id"]).status == "running"


def test_a_clone_from_a_file_starts_with_its_data(api, committed, fake):
    with committed():
        response = api.post(
            "/api/storage/redis/instances", {"name": "seeded", "file": upload({"s": 1})}, format="multipart"
        )
    assert response.status_code == 202, response.content
    instance = Instance.objects.get(pk=response.json()["id"])
    assert instance.status == "running", instance.status_message
    assert fake.server(instance.pk).data == {"s": 1}
    assert "seeded with an uploaded file" in history(instance.pk)[0]
    assert kept_uploads() == []


def test_a_clone_from_a_bad_file_fails_and_keeps_nothing(api, committed, fake):
    with committed():
        response = api.post("/api/storage/redis/instances", {"file": upload(b"[1, 2]")}, format="multipart")
    assert response.status_code == 202
    instance = Instance.objects.get(pk=response.json()["id"])
    assert instance.status == "failed"
    assert "The file is not a JSON object" in instance.status_message
    assert fake.server(instance.pk) is None and kept_uploads() == []


def test_a_file_and_a_clone_source_together_are_refused(api):
    response = api.post("/api/storage/redis/instances", {"file": upload({}), "from_snapshot": 1}, format="multipart")
    assert response.status_code == 400
    assert "file" in response.json()


def test_the_import_moves_are_declared():
    check_transition(Side.REQUEST, (Status.RUNNING,), Status.IMPORTING)
    check_transition(Side.REQUEST, (Status.IMPORTING,), Status.RUNNING)  # the job could not be queued
    check_transition(Side.WORKER, (Status.IMPORTING,), Status.RUNNING)
    check_transition(Side.WORKER, (Status.IMPORTING,), Status.UNHEALTHY)


def test_a_kept_upload_that_vanished_ends_the_import_unchanged(api, running, committed, fake):
    pk = running["id"]
    post_import(api, running, upload({"a": 1}))
    instance = Instance.objects.get(pk=pk)
    storages["snapshots"].delete(instance.import_file)
    imports.run(pk)
    instance.refresh_from_db()
    assert instance.status == "running"
    assert "no longer kept" in instance.status_message
    assert fake.server(pk).data == {"old": 1}


def fake_error(message: str) -> Exception:
    return BackendError(message)


# The page ----------------------------------------------------------------------------------


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


def test_the_page_imports_through_the_same_service_with_an_upload_progress_bar(web, running, committed, fake):
    pk = running["id"]
    page = web.get(f"/instances/{pk}/").content.decode()
    assert 'enctype="multipart/form-data"' in page and "<progress" in page and 'accept=".rdb"' in page
    assert "https://" not in page.split('id="import"')[1].split("</section>")[0]  # no CDN: plain script
    with committed():
        response = web.post(f"/instances/{pk}/import/", {"file": upload({"p": 1})}, follow=True)
    assert "is being imported" in response.content.decode()
    assert Instance.objects.get(pk=pk).status == "running"
    assert fake.server(pk).data == {"old": 1, "p": 1}


def test_the_page_refuses_a_file_over_the_limit_and_a_missing_one_with_a_message(web, running, settings):
    pk = running["id"]
    settings.STOCKROOM_IMPORT_MAX_BYTES = 10
    page = web.post(f"/instances/{pk}/import/", {"file": upload({"k": "x" * 50})}, follow=True).content.decode()
    assert "an import may take at most 10" in page
    assert "Choose a file to import." in web.post(f"/instances/{pk}/import/", {}, follow=True).content.decode()
    assert Instance.objects.get(pk=pk).status == "running" and kept_uploads() == []


def test_an_outsider_gets_404_from_the_import_page(running, client, charlie):
    client.force_login(charlie)
    assert client.post(f"/instances/{running['id']}/import/", {"file": upload({})}).status_code == 404


def test_operators_see_importing_and_its_history_in_the_admin(running, api, admin_client):
    post_import(api, running, upload({"a": 1}))  # never committed: it stays importing
    listing = admin_client.get("/admin/provisioning/instance/?status__exact=importing").content.decode()
    assert running["name"] in listing
    page = admin_client.get(f"/admin/provisioning/instance/{running['id']}/change/").content.decode()
    assert "Import of seed.rdb" in page


def test_an_import_that_cannot_be_queued_is_put_back_and_its_file_removed(api, running, committed, monkeypatch):
    def broker_down(*args, **kwargs):
        raise ConnectionError("the broker is down")

    monkeypatch.setattr("provisioning.services.jobs.send", broker_down)
    with committed():
        assert post_import(api, running, upload({"a": 1})).status_code == 202
    instance = Instance.objects.get(pk=running["id"])
    assert instance.status == "running" and "could not be queued" in instance.status_message
    assert instance.import_file == "" and kept_uploads() == []
