"""One reconcile pass at a time, called directly (tasks run inline), against real servers."""

import copy
import os
import signal
import subprocess
import time
from datetime import timedelta

import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone

from provisioning import tasks
from provisioning.backends.base import get_backend
from provisioning.backends.local import processes_under
from provisioning.models import Heartbeat, Instance, Orphan, Status
from provisioning.reconciler import Reconciler
from provisioning.services import DELETABLE, Busy, heal, perform_action, recover
from provisioning.services.claims import claim, release
from provisioning.services.state import Side, transition

from .conftest import instance_dir, port_refuses, server_dir, wait_for_status

REQUEST, WORKER, HEALER = Side.REQUEST, Side.WORKER, Side.HEALER
ROTATION = "Password rotation requested by alice."

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api):
    """The instances a test leaves are deleted through the API when it ends, as their owner would."""
    yield
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def running_redis(api) -> Instance:
    pk = api.post("/api/storage/redis/instances", {}).json()["id"]
    assert wait_for_status(api, "redis", pk, "running", "failed")["status"] == "running"
    return Instance.objects.get(pk=pk)


def kill(instance: Instance) -> None:
    for pid in processes_under(instance_dir(instance.kind, instance.pk)):
        os.kill(pid, signal.SIGKILL)


def break_redis_server(settings) -> None:
    """From now on redis-server cannot start (as if its binary had been removed)."""
    backends = copy.deepcopy(settings.STOCKROOM_BACKENDS)
    backends["local"]["OPTIONS"]["programs"]["redis-server"] = "/bin/false"
    settings.STOCKROOM_BACKENDS = backends


def test_it_gives_up_after_the_last_restart_and_keeps_the_data(api, settings):
    settings.STOCKROOM_MAX_RESTARTS = 2
    settings.STOCKROOM_RESTART_BACKOFF = 0
    instance = running_redis(api)
    break_redis_server(settings)
    kill(instance)

    reports = [Reconciler().run_once() for _ in range(3)]
    assert reports[0].unhealthy == [instance.pk]
    assert [report.heals for report in reports] == [[instance.pk]] * 3

    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.status_message.startswith(
        "Gave up after 2 restarts: it did not come back, or did not stay up for 600 s (last: Restart 2 of 2 failed"
    )
    assert instance.port is None
    assert not processes_under(instance_dir("redis", instance.pk))
    assert (server_dir("redis", instance.pk) / "data").is_dir(), "the data is kept until the owner deletes it"
    assert [event.to_status for event in instance.events.all()] == ["provisioning", "running", "unhealthy", "failed"]

    api.delete(f"/api/storage/redis/instances/{instance.pk}")
    wait_for_status(api, "redis", instance.pk, "gone")
    assert not instance_dir("redis", instance.pk).exists()


def test_restarts_back_off(api, settings):
    settings.STOCKROOM_RESTART_BACKOFF = 60
    instance = running_redis(api)
    break_redis_server(settings)
    kill(instance)
    Reconciler().run_once()  # notices, restarts once (fails), next try in 60 s
    assert Reconciler().run_once().heals == []
    instance.refresh_from_db()
    assert (instance.status, instance.restart_attempts) == (Status.UNHEALTHY, 1)
    assert instance.status_message.startswith("Restart 1 of 5 failed: The server exited during start-up.")


def test_a_claimed_instance_is_left_to_its_worker(api):
    instance = running_redis(api)
    kill(instance)
    assert transition(instance, Status.UNHEALTHY, "test", side=HEALER, allowed_from=(Status.RUNNING,))
    keeper = claim(instance, seconds=60)
    assert keeper
    assert not claim(instance, seconds=60), "a second worker cannot take it"
    heal(instance.pk)  # what a second worker would do
    instance.refresh_from_db()
    assert (instance.status, instance.restart_attempts) == (Status.UNHEALTHY, 0)
    assert Reconciler().run_once().heals == []
    release(instance, keeper)
    assert Reconciler().run_once().heals == [instance.pk]
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING


def test_a_lost_delete_is_finished(api, settings):
    settings.STOCKROOM_STUCK_TIMEOUT = 0
    instance = running_redis(api)
    port = instance.port
    # As if the worker died before it picked up the job: the status says deleting, nothing happened.
    assert transition(instance, Status.DELETING, "Deletion requested.", side=REQUEST, allowed_from=(Status.RUNNING,))
    assert Reconciler().run_once().stuck == [instance.pk]
    instance.refresh_from_db()
    assert instance.status == Status.DELETED
    assert not instance_dir("redis", instance.pk).exists()
    assert port_refuses(port)


@pytest.fixture
def orphan_folder():
    """What a portal that lost its database row would leave: a folder with a server in it."""
    folder = django_settings.STOCKROOM_INSTANCES_DIR / "redis" / "987654"
    folder.mkdir(parents=True)
    process = subprocess.Popen(["sleep", "300"], cwd=folder)
    yield folder
    process.kill()
    process.wait()


def test_orphans_are_shown_to_operators_then_removed(orphan_folder, settings, admin_client):
    settings.STOCKROOM_ORPHAN_GRACE = 3600
    assert Reconciler().run_once().orphans == 1
    orphan = Orphan.objects.get()
    assert orphan.key == "redis/987654"
    assert "server running (pid" in orphan.description
    assert processes_under(orphan_folder), "still within the grace period"
    page = admin_client.get("/admin/provisioning/orphan/").content.decode()
    assert "redis/987654" in page

    settings.STOCKROOM_ORPHAN_GRACE = 0
    Reconciler().run_once()
    orphan.refresh_from_db()
    assert orphan.removed_at is not None
    assert not orphan_folder.exists()
    assert Reconciler().run_once().orphans == 0


def test_an_action_waits_while_another_worker_holds_the_instance(api):
    instance = running_redis(api)
    assert transition(
        instance, Status.STOPPING, "Stop requested by alice.", side=REQUEST, allowed_from=(Status.RUNNING,)
    )
    holder = Instance.objects.get(pk=instance.pk)
    keeper = claim(holder, seconds=60)  # say, a heal in progress
    assert keeper
    with pytest.raises(Busy):
        perform_action(instance.pk, "stop")
    assert Busy in tasks.perform_action.autoretry_for  # so the worker tries again shortly
    release(holder, keeper)
    perform_action(instance.pk, "stop")
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED


def test_a_probe_that_raced_a_change_does_not_count(api):
    instance = running_redis(api)
    seen = Instance.objects.get(pk=instance.pk)  # what a pass read before probing
    assert transition(
        instance,
        Status.ROTATING,
        ROTATION,
        side=REQUEST,
        allowed_from=(Status.RUNNING,),
    )
    assert transition(instance, Status.RUNNING, "Password rotated.", side=WORKER, allowed_from=(Status.ROTATING,))
    assert not transition(
        seen,
        Status.UNHEALTHY,
        "Stopped answering.",
        side=HEALER,
        allowed_from=(Status.RUNNING,),
        unchanged_since=seen.updated_at,
    )
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING


def test_a_probe_is_a_login_with_the_users_credentials(api):
    """The reconciler's probe (over the server's socket, without redis-py) proves the user's login:
    a wrong password or user name is refused, and so is a server that is gone."""
    instance = running_redis(api)
    backend = get_backend(instance.backend)
    assert backend.login_error(instance, timeout=2) is None
    wrong = Instance.objects.get(pk=instance.pk)
    wrong.password = "not-" + instance.password
    assert backend.login_error(wrong, timeout=2) == "AuthenticationError"
    wrong = Instance.objects.get(pk=instance.pk)
    wrong.username = "nobody"
    assert backend.login_error(wrong, timeout=2) == "AuthenticationError"
    kill(instance)
    assert backend.login_error(instance, timeout=2) is not None


def test_a_server_that_keeps_dying_after_each_restart_ends_failed(api, settings):
    settings.STOCKROOM_MAX_RESTARTS = 2
    settings.STOCKROOM_RESTART_BACKOFF = 0
    instance = running_redis(api)
    for attempt in (1, 2):
        kill(instance)
        Reconciler().run_once()  # noticed and restarted: running again, but not for long
        instance.refresh_from_db()
        assert (instance.status, instance.restart_attempts) == (Status.RUNNING, attempt)
    kill(instance)
    Reconciler().run_once()
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.status_message.startswith("Gave up after 2 restarts")


def test_a_server_that_stayed_up_starts_counting_again(api, settings):
    settings.STOCKROOM_STABLE_SECONDS = 0
    instance = running_redis(api)
    for _ in range(3):
        kill(instance)
        Reconciler().run_once()
        instance.refresh_from_db()
        assert (instance.status, instance.restart_attempts) == (Status.RUNNING, 1)


def test_passes_never_overlap(api):
    instance = running_redis(api)
    Reconciler().run_once()
    Heartbeat.objects.filter(name="reconciler").update(running_until=timezone.now() + timedelta(seconds=60))
    kill(instance)  # something to do, but another pass holds the turn
    report = Reconciler().run_once()
    assert report.skipped and report.probed == 0
    Heartbeat.objects.filter(name="reconciler").update(running_until=timezone.now() - timedelta(seconds=1))
    assert Reconciler().run_once().unhealthy == [instance.pk], "a turn left by a dead pass expires"
    assert Heartbeat.objects.get(name="reconciler").running_until is None


def test_a_server_that_died_again_soon_waits_for_its_backoff(api, settings):
    settings.STOCKROOM_RESTART_BACKOFF = 60
    instance = running_redis(api)
    kill(instance)
    assert Reconciler().run_once().heals == [instance.pk]  # the first failure: restarted at once
    kill(instance)
    assert Reconciler().run_once().heals == []  # again, soon after: it waits
    instance.refresh_from_db()
    assert (instance.status, instance.restart_attempts) == (Status.UNHEALTHY, 1)
    assert instance.next_restart_at > timezone.now() + timedelta(seconds=100)  # 60 s doubled


def test_a_claim_is_renewed_while_its_worker_lives_and_lapses_after_the_task_limit(api, settings):
    instance = running_redis(api)
    keeper = claim(instance, seconds=0.6)  # renewed every 0.2 s
    assert keeper
    time.sleep(1.5)
    instance.refresh_from_db()
    assert instance.claimed_until > timezone.now(), "still held: its worker is alive"
    release(instance, keeper)
    instance.refresh_from_db()
    assert instance.claimed_until is None

    settings.STOCKROOM_TASK_TIME_LIMIT = 0.5  # a hung worker stops renewing after this
    keeper = claim(instance, seconds=0.3)
    assert keeper
    time.sleep(1.5)
    instance.refresh_from_db()
    assert instance.claimed_until < timezone.now(), "lapsed: recovery can take over"
    release(instance, keeper)


def test_a_rotation_cut_short_is_done_again(api):
    instance = running_redis(api)
    old = instance.password
    # As if the worker died during the rotation: the status says rotating, the job is gone.
    assert transition(
        instance,
        Status.ROTATING,
        ROTATION,
        side=REQUEST,
        allowed_from=(Status.RUNNING,),
    )
    recover(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING
    assert instance.password != old
    config = api.get(f"/api/storage/redis/instances/{instance.pk}/config").json()
    assert redis.Redis(port=config["port"], password=instance.password).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=config["port"], password=old).ping()


@pytest.mark.parametrize(
    ("busy", "ends", "message"),
    [
        (Status.RESTARTING, Status.UNHEALTHY, "The worker handling it stopped twice; the restart was given up."),
        (Status.DELETING, Status.FAILED, "The worker handling it stopped twice: the delete was given up; try again."),
    ],
)
def test_work_cut_short_twice_is_given_up(api, busy, ends, message):
    instance = running_redis(api)
    Instance.objects.filter(pk=instance.pk).update(status=busy, recoveries=1)
    recover(instance.pk)
    instance.refresh_from_db()
    assert (instance.status, instance.status_message, instance.recoveries) == (ends, message, 0)
    if ends == Status.FAILED:
        assert not instance_dir("redis", instance.pk).exists()
