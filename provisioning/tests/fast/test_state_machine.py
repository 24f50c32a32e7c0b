"""Statuses through create, stop, start, restart, rotate and delete, and what each failure leaves."""

import json

import pytest
from django.conf import settings
from django.core.files.storage import storages

from provisioning.backends.base import BackendError, ServerExited
from provisioning.models import Instance, Snapshot, Status

pytestmark = pytest.mark.django_db


def transitions(api, instance: dict) -> list[tuple[str, str]]:
    url = f"/api/storage/{instance['kind']}/instances/{instance['id']}/events?page_size=100"
    return [(event["from"], event["to"]) for event in api.get(url).json()["results"]]


def password(api, instance: dict) -> str:
    return api.get(f"/api/storage/{instance['kind']}/instances/{instance['id']}/config").json()["password"]


def test_a_create_ends_running_with_the_cleaned_options(api, create, fake):
    instance = create("redis", maxmemory="128mb", name="cache")
    assert (instance["status"], instance["status_message"]) == (
        "running",
        "Started; a login with the user's credentials succeeded.",
    )
    server = fake.server(instance["id"])
    assert server.running and server.port == instance["port"]
    assert server.options == instance["options"] and server.options["maxmemory"] == 128 * 1024**2
    assert server.password == password(api, instance)
    assert set(instance["timings"]) == {"queued", "server_start", "first_login"}
    assert transitions(api, instance) == [("", "provisioning"), ("provisioning", "running")]


def test_stop_start_restart_rotate_and_delete(api, create, act, fake):
    instance = create("mysql")
    pk, port = instance["id"], instance["port"]
    fake.server(pk).data["orders"] = ["teapot"]

    stopped = act(instance, "stop")
    assert (stopped["status"], stopped["status_message"]) == ("stopped", "Stopped; data kept.")
    assert not fake.server(pk).running
    assert act(instance, "start")["status"] == "running"
    assert fake.server(pk).running
    assert act(instance, "restart")["status_message"] == "Restarted; a login succeeded."
    assert fake.server(pk).data["orders"] == ["teapot"]

    old = password(api, instance)
    assert act(instance, "rotate-password")["status_message"] == "Password rotated; the old one no longer works."
    new = password(api, instance)
    assert new != old and len(new) >= 24
    assert fake.server(pk).password == new

    assert act(instance, "delete") == {"status": "gone"}
    assert fake.server(pk) is None
    gone = Instance.objects.get(pk=pk)
    assert gone.status == Status.DELETED
    # The delete's undo: a snapshot of the data, taken while the server still ran.
    kept = Snapshot.objects.get(instance=gone, trigger="before-delete")
    assert json.loads(storages["snapshots"].open(kept.file).read()) == {"orders": ["teapot"]}
    assert gone.status_message == (
        f"Stopped and removed; port {port} released. Snapshot {kept.pk} of its data is kept until "
        f"{kept.expires_at:%Y-%m-%d %H:%M} UTC; a clone of it brings the data back."
    )
    assert [(e.from_status, e.to_status) for e in gone.events.all()] == [
        ("", "provisioning"),
        ("provisioning", "running"),
        ("running", "stopping"),
        ("stopping", "stopped"),
        ("stopped", "starting"),
        ("starting", "running"),
        ("running", "restarting"),
        ("restarting", "running"),
        ("running", "rotating"),
        ("rotating", "running"),
        ("running", "deleting"),
        ("deleting", "deleted"),
    ]
    assert create("mysql")["port"] == port, "the port was released"


def test_actions_the_status_does_not_allow_are_conflicts(api, create, act):
    instance = create("redis")
    assert act(instance, "start", expect=409)["status"] == "running"
    act(instance, "stop")
    for action in ("stop", "restart", "rotate-password"):
        response = api.post(f"/api/storage/redis/instances/{instance['id']}/{action}")
        assert response.status_code == 409
        assert response.json() == {"detail": f"Cannot {action.replace('-', ' ')} an instance that is stopped.",
                                   "status": "stopped"}  # fmt: skip

    waiting = api.post("/api/storage/redis/instances", {}).json()  # its job has not run: still provisioning
    for action in ("stop", "start", "restart", "rotate-password"):
        assert api.post(f"/api/storage/redis/instances/{waiting['id']}/{action}").status_code == 409
    assert api.delete(f"/api/storage/redis/instances/{waiting['id']}").status_code == 409
    assert Instance.objects.get(pk=waiting["id"]).status == Status.PROVISIONING


def test_a_server_that_dies_while_starting_is_started_once_more(api, committed, fake):
    fake.fail_next("create", ServerExited("The server exited during start-up."))
    with committed():
        reserved = api.post("/api/storage/redis/instances", {}).json()
    assert api.get(f"/api/storage/redis/instances/{reserved['id']}").json()["status"] == "running"
    assert Instance.objects.get(pk=reserved["id"]).recoveries == 0, "a running instance has its redo again"


def test_a_server_that_dies_twice_while_starting_fails_the_create(api, committed, fake):
    fake.fail_next("create", ServerExited("The server exited during start-up."), times=2)
    with committed():
        reserved = api.post("/api/storage/redis/instances", {}).json()
    failed = api.get(f"/api/storage/redis/instances/{reserved['id']}").json()
    assert failed["status"] == "failed"
    assert failed["status_message"] == "Provisioning failed, on its second try: The server exited during start-up."
    assert fake.server(failed["id"]) is None


def test_a_failed_create_ends_failed_with_the_backends_message_and_frees_its_port(api, committed, fake):
    fake.fail_next("create", BackendError("The server exited during start-up. Out of memory."))
    with committed():
        reserved = api.post("/api/storage/redis/instances", {}).json()
    failed = api.get(f"/api/storage/redis/instances/{reserved['id']}").json()
    assert failed["status"] == "failed"
    assert failed["status_message"] == "Provisioning failed: The server exited during start-up. Out of memory."
    assert failed["port"] is None
    assert fake.server(failed["id"]) is None, "what the failed create left was destroyed"
    assert api.get(f"/api/storage/redis/instances/{failed['id']}/config").status_code == 409
    assert transitions(api, failed) == [("", "provisioning"), ("provisioning", "failed")]

    with committed():
        next_one = api.post("/api/storage/redis/instances", {}).json()
    assert next_one["port"] == reserved["port"]


def test_an_unexpected_error_is_not_shown_to_the_owner(create, fake):
    fake.fail_next("create", RuntimeError("connect to 10.0.0.7 as admin:hunter2 failed"))
    failed = create("mysql")
    assert failed["status_message"] == (
        "Provisioning failed: unexpected RuntimeError; an operator can find details in the worker log."
    )


def test_a_create_whose_cleanup_fails_says_so(create, fake):
    fake.fail_next("create", BackendError("No space left on device."))
    fake.fail_next("destroy", BackendError("Device or resource busy"))
    failed = create("redis")
    assert (failed["status"], failed["port"]) == ("failed", None)
    assert failed["status_message"] == (
        "Provisioning failed: No space left on device. Cleaning up also failed (Device or resource busy); "
        "an operator must remove what is left."
    )


def test_a_failed_start_ends_stopped_with_nothing_left_running(create, act, fake):
    instance = create("redis")
    act(instance, "stop")
    fake.fail_next("start", BackendError("The server exited during start-up."))
    after = act(instance, "start")
    assert after["status"] == "stopped"
    assert after["status_message"] == "Start failed: The server exited during start-up."
    assert not fake.server(instance["id"]).running
    assert fake.called("stop") == [instance["id"]] * 2, "what may have started was stopped again"
    assert act(instance, "start")["status"] == "running", "and it can be started again"


@pytest.mark.parametrize(("action", "title"), [("stop", "Stop"), ("restart", "Restart")])
def test_a_failed_stop_or_restart_leaves_it_unhealthy_for_the_reconciler(create, act, fake, action, title):
    instance = create("redis")
    fake.fail_next("stop", BackendError("Timed out waiting for the server to exit."))
    after = act(instance, action)
    assert (after["status"], after["status_message"]) == (
        "unhealthy",
        f"{title} failed: Timed out waiting for the server to exit.",
    )


def test_a_failed_rotation_keeps_the_old_password(api, create, act, fake):
    instance = create("redis")
    old = password(api, instance)
    fake.fail_next("set_password", BackendError("The server did not take the new ACL file."))
    after = act(instance, "rotate-password")
    assert after["status"] == "unhealthy"
    assert after["status_message"] == "Password rotation failed: The server did not take the new ACL file."
    assert password(api, instance) == old
    assert fake.server(instance["id"]).password == old, "the old password was put back on the server"


def test_a_failed_delete_ends_failed_and_can_be_tried_again(create, act, fake):
    instance = create("mysql")
    fake.fail_next("destroy", BackendError("Device or resource busy."))
    failed = act(instance, "delete")
    assert (failed["status"], failed["port"]) == ("failed", None)
    assert failed["status_message"] == "Delete failed: Device or resource busy. Try deleting again."
    assert act(instance, "delete") == {"status": "gone"}
    assert fake.server(instance["id"]) is None


def test_no_free_port_is_a_503_that_names_the_setting(api, fake, settings):
    first, _ = settings.STOCKROOM_PORT_RANGE
    settings.STOCKROOM_PORT_RANGE = (first, first + 1)
    fake.squatted.add(first)  # something outside the portal listens there
    assert api.post("/api/storage/redis/instances", {}).json()["port"] == first + 1
    response = api.post("/api/storage/redis/instances", {})
    assert response.status_code == 503
    assert "STOCKROOM_PORT_RANGE" in response.json()["detail"]


def test_the_default_backend_serves_new_instances(api):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert Instance.objects.get(pk=pk).backend == settings.STOCKROOM_DEFAULT_BACKEND == "fake"
