"""What a reconcile pass decides: heal, wait, give up, recover, or leave alone."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from provisioning.backends.base import BackendError
from provisioning.models import Heartbeat, Instance, Orphan, Status

from ..conftest import client_for
from .conftest import reconcile

pytestmark = pytest.mark.django_db


def reasons(pk: int) -> list[tuple[str, str]]:
    return [(event.to_status, event.reason) for event in Instance.objects.get(pk=pk).events.all()]


def test_a_healthy_server_is_left_alone(create, fake):
    instance = create("redis")
    report = reconcile()
    assert (report.probed, report.unhealthy, report.heals, report.stuck) == (1, [], [], [])
    assert fake.called("stop") == fake.called("start") == []
    assert Instance.objects.get(pk=instance["id"]).status == Status.RUNNING


def test_a_dead_server_becomes_unhealthy_and_is_restarted_with_its_data(create, fake):
    pk = create("redis")["id"]
    fake.server(pk).data["order:1"] = "teapot"
    fake.kill(pk)
    report = reconcile()
    assert (report.unhealthy, report.heals) == ([pk], [pk])
    assert reasons(pk)[-2:] == [
        ("unhealthy", "Stopped answering (NotAnswering); restarting it."),
        ("running", "Restarted after it stopped answering (attempt 1)."),
    ]
    assert Instance.objects.get(pk=pk).restart_attempts == 1
    assert fake.server(pk).running and fake.server(pk).data == {"order:1": "teapot"}


def test_an_unhealthy_server_that_answers_again_is_running(create, act, fake):
    instance = create("redis")
    fake.fail_next("stop", BackendError("Timed out waiting for the server to exit."))
    assert act(instance, "stop")["status"] == "unhealthy"  # and the server still runs
    assert reconcile().recovered == [instance["id"]]
    assert reasons(instance["id"])[-1] == ("running", "Answers again.")
    assert fake.called("start") == [], "no restart was needed"


def test_failed_restarts_back_off(create, fake, settings):
    settings.STOCKROOM_RESTART_BACKOFF = 60
    pk = create("redis")["id"]
    fake.kill(pk)
    fake.fail_next("start", BackendError("The server exited during start-up."), times=10)

    before = timezone.now()
    assert reconcile().heals == [pk]
    instance = Instance.objects.get(pk=pk)
    assert (instance.status, instance.restart_attempts) == (Status.UNHEALTHY, 1)
    assert instance.status_message == "Restart 1 of 5 failed: The server exited during start-up."
    assert before + timedelta(seconds=60) <= instance.next_restart_at <= timezone.now() + timedelta(seconds=60)

    assert reconcile().heals == [], "not before its time"
    assert fake.called("start") == [pk]

    Instance.objects.filter(pk=pk).update(next_restart_at=timezone.now())  # as if the wait were over
    before = timezone.now()
    assert reconcile().heals == [pk]
    instance.refresh_from_db()
    assert instance.restart_attempts == 2
    assert instance.next_restart_at >= before + timedelta(seconds=120), "the wait doubles"
    assert fake.called("start") == [pk, pk]


def test_it_gives_up_after_the_last_restart_and_keeps_the_data(api, act, create, fake, settings):
    settings.STOCKROOM_MAX_RESTARTS = 2
    settings.STOCKROOM_RESTART_BACKOFF = 0
    instance = create("redis")
    pk = instance["id"]
    fake.kill(pk)
    fake.fail_next("start", BackendError("The server exited during start-up."), times=10)

    reports = [reconcile() for _ in range(3)]
    assert [report.heals for report in reports] == [[pk]] * 3
    failed = Instance.objects.get(pk=pk)
    assert (failed.status, failed.port) == (Status.FAILED, None)
    assert failed.status_message.startswith(
        "Gave up after 2 restarts: it did not come back, or did not stay up for 600 s "
        "(last: Restart 2 of 2 failed: The server exited during start-up.)"
    )
    assert fake.called("start") == [pk, pk], "two restarts, no third"
    assert fake.server(pk) is not None and not fake.server(pk).running, "stopped; the data is kept"
    assert [to for to, _ in reasons(pk)] == ["provisioning", "running", "unhealthy", "failed"]
    assert reconcile().heals == [], "a failed instance is not probed"

    assert act(instance, "delete") == {"status": "gone"}
    assert fake.server(pk) is None


def test_a_server_that_keeps_dying_soon_after_each_restart_ends_failed(create, fake, settings):
    settings.STOCKROOM_MAX_RESTARTS = 2
    settings.STOCKROOM_RESTART_BACKOFF = 0
    pk = create("redis")["id"]
    for attempt in (1, 2):
        fake.kill(pk)
        reconcile()
        instance = Instance.objects.get(pk=pk)
        assert (instance.status, instance.restart_attempts) == (Status.RUNNING, attempt)
    fake.kill(pk)
    reconcile()
    assert Instance.objects.get(pk=pk).status_message.startswith("Gave up after 2 restarts")


def test_a_server_that_died_again_soon_waits_then_one_that_stayed_up_counts_afresh(create, fake, settings):
    settings.STOCKROOM_RESTART_BACKOFF = 60
    pk = create("redis")["id"]
    fake.kill(pk)
    assert reconcile().heals == [pk], "the first failure: restarted at once"
    fake.kill(pk)
    assert reconcile().heals == [], "again, soon after: it waits"
    instance = Instance.objects.get(pk=pk)
    assert (instance.status, instance.restart_attempts) == (Status.UNHEALTHY, 1)
    assert instance.next_restart_at > timezone.now() + timedelta(seconds=100)  # 60 s doubled

    Instance.objects.filter(pk=pk).update(next_restart_at=timezone.now())
    reconcile()
    assert Instance.objects.get(pk=pk).restart_attempts == 2
    up_since = timezone.now() - timedelta(seconds=settings.STOCKROOM_STABLE_SECONDS + 1)
    Instance.objects.filter(pk=pk).update(updated_at=up_since)  # as if it had stayed up since
    fake.kill(pk)
    assert reconcile().heals == [pk]
    assert Instance.objects.get(pk=pk).restart_attempts == 1, "counted afresh"


def test_an_instance_another_worker_holds_is_left_to_it(create, fake):
    pk = create("redis")["id"]
    fake.kill(pk)
    Instance.objects.filter(pk=pk).update(
        status=Status.UNHEALTHY, claimed_until=timezone.now() + timedelta(seconds=60)
    )  # a heal in progress
    assert reconcile().heals == []
    assert fake.called("start") == []
    Instance.objects.filter(pk=pk).update(claimed_until=timezone.now() - timedelta(seconds=1))  # its worker died
    assert reconcile().heals == [pk]
    assert Instance.objects.get(pk=pk).status == Status.RUNNING


def test_a_delete_whose_job_was_lost_is_finished(api, create, fake, settings):
    instance = create("redis")
    pk = instance["id"]
    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202  # the job is never run
    assert reconcile().stuck == [], "not stuck yet"
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == [pk]
    assert Instance.objects.get(pk=pk).status == Status.DELETED
    assert fake.server(pk) is None


def test_a_create_whose_worker_died_after_the_server_came_up_is_running(api, fake, settings):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]  # the job is never run...
    fake.create(Instance.objects.get(pk=pk))  # ...but the dead worker had started the server
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == [pk]
    instance = Instance.objects.get(pk=pk)
    assert (instance.status, instance.status_message) == (
        Status.RUNNING,
        "The worker handling it stopped; the server answers, so it is running.",
    )
    assert fake.called("create") == [pk], "not created twice"


def test_a_create_whose_worker_died_before_the_server_came_up_is_done_again(api, fake, settings):
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == [pk]
    assert Instance.objects.get(pk=pk).status == Status.RUNNING
    assert fake.server(pk).running


@pytest.mark.parametrize(
    ("action", "ends"), [("stop", Status.STOPPED), ("restart", Status.RUNNING), ("rotate-password", Status.RUNNING)]
)
def test_an_action_whose_job_was_lost_is_done_again(api, create, fake, settings, action, ends):
    pk = create("redis")["id"]
    assert api.post(f"/api/storage/redis/instances/{pk}/{action}").status_code == 202  # the job is never run
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == [pk]
    instance = Instance.objects.get(pk=pk)
    assert (instance.status, instance.recoveries) == (ends, 0)
    assert fake.server(pk).running == (ends == Status.RUNNING)
    assert fake.server(pk).password == instance.password


def test_a_busy_instance_its_worker_still_holds_is_not_recovered(api, create, settings):
    pk = create("redis")["id"]
    api.post(f"/api/storage/redis/instances/{pk}/restart")
    Instance.objects.filter(pk=pk).update(claimed_until=timezone.now() + timedelta(hours=1))
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == []
    assert Instance.objects.get(pk=pk).status == Status.RESTARTING


@pytest.mark.parametrize(
    ("busy", "ends", "message"),
    [
        (Status.RESTARTING, Status.UNHEALTHY, "The worker handling it stopped twice; the restart was given up."),
        (Status.DELETING, Status.FAILED, "The worker handling it stopped twice: the delete was given up; try again."),
    ],
)
def test_work_cut_short_twice_is_given_up(create, fake, settings, busy, ends, message):
    pk = create("redis")["id"]
    Instance.objects.filter(pk=pk).update(status=busy, recoveries=1)
    assert reconcile(later=settings.STOCKROOM_STUCK_TIMEOUT + 1).stuck == [pk]
    instance = Instance.objects.get(pk=pk)
    assert (instance.status, instance.status_message, instance.recoveries) == (ends, message, 0)
    assert (fake.server(pk) is None) == (ends == Status.FAILED), "a given-up delete removes what is left"


@pytest.mark.django_db(transaction=True)  # the owner's request runs in a probe's thread, on its own connection
def test_a_probe_that_raced_a_change_does_not_count(alice, create, fake):
    pk = create("redis")["id"]
    old = Instance.objects.get(pk=pk).password

    def owner_rotates_meanwhile(instance):
        fake.while_probing = None
        try:  # the pass probes with the password it read, which this makes stale
            assert client_for(alice).post(f"/api/storage/redis/instances/{pk}/rotate-password").status_code == 202
        finally:
            connection.close()

    fake.while_probing = owner_rotates_meanwhile
    report = reconcile()
    assert report.probed == 1 and report.unhealthy == []
    instance = Instance.objects.get(pk=pk)
    assert instance.status == Status.RUNNING and instance.password != old
    assert [to for to, _ in reasons(pk)] == ["provisioning", "running", "rotating", "running"]


def test_passes_never_overlap(create, fake):
    pk = create("redis")["id"]
    Heartbeat.objects.update_or_create(
        name="reconciler", defaults={"running_until": timezone.now() + timedelta(seconds=60)}
    )
    fake.kill(pk)
    report = reconcile()
    assert report.skipped and report.probed == 0
    assert Instance.objects.get(pk=pk).status == Status.RUNNING
    Heartbeat.objects.filter(name="reconciler").update(running_until=timezone.now() - timedelta(seconds=1))
    assert reconcile().unhealthy == [pk], "a turn left by a dead pass expires"
    assert Heartbeat.objects.get(name="reconciler").running_until is None


def test_orphans_are_listed_then_removed_after_the_grace_period(create, fake, settings):
    pk = create("redis")["id"]
    Instance.objects.filter(pk=pk).delete()  # a portal that lost the row keeps the server running
    assert reconcile().orphans == 1
    orphan = Orphan.objects.get()
    assert (orphan.backend, orphan.key, orphan.removed_at) == ("fake", str(pk), None)
    assert fake.server(pk) is not None, "kept within the grace period"

    reconcile(later=settings.STOCKROOM_ORPHAN_GRACE + 1)
    orphan.refresh_from_db()
    assert orphan.removed_at is not None
    assert fake.server(pk) is None
    assert reconcile().orphans == 0
