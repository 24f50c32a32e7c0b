"""A server that is started or restarted while a stranger listens on its port moves to a free one.

The fake's squatted ports are what something outside the portal listens on; its start fails on
one, as a real server that cannot listen exits. The real tier replays this with real servers and a
real squatter (test_port_squatting.py).
"""

import pytest

from provisioning.models import Instance

from .conftest import reconcile

pytestmark = pytest.mark.django_db


def last_event(instance: dict) -> tuple[str, str, str]:
    event = Instance.objects.get(pk=instance["id"]).events.last()
    return event.from_status, event.to_status, event.reason


def test_a_start_whose_port_a_stranger_took_moves_to_a_free_port(api, create, act, fake):
    instance = create("redis")
    old = instance["port"]
    fake.server(instance["id"]).data["k"] = "v"
    act(instance, "stop")
    fake.squatted.add(old)

    started = act(instance, "start")
    new = started["port"]
    assert started["status"] == "running" and new != old
    moved = f"Port {old} was taken by another process; moved to {new}."
    assert started["status_message"] == f"Started; a login succeeded. {moved}"
    assert last_event(instance) == ("starting", "running", f"Started; a login succeeded. {moved}")
    assert api.get(f"/api/storage/redis/instances/{instance['id']}/config").json()["port"] == new
    server = fake.server(instance["id"])
    assert server.running and server.port == new and server.data == {"k": "v"}


def test_a_start_on_a_free_port_stays_there_and_says_nothing_of_ports(create, act):
    instance = create("mysql")
    act(instance, "stop")
    started = act(instance, "start")
    assert (started["port"], started["status_message"]) == (instance["port"], "Started; a login succeeded.")


def test_a_restart_keeps_the_port_its_own_server_holds(create, act, fake):
    instance = create("redis")
    assert not fake.port_is_free(instance["port"]), "the running server holds it"
    restarted = act(instance, "restart")
    assert (restarted["port"], restarted["status_message"]) == (instance["port"], "Restarted; a login succeeded.")


def test_a_start_with_no_free_port_left_stays_stopped_and_says_why(create, act, fake, settings):
    first, _ = settings.STOCKROOM_PORT_RANGE
    settings.STOCKROOM_PORT_RANGE = (first, first)
    instance = create("redis")
    act(instance, "stop")
    fake.squatted.add(first)
    after = act(instance, "start")
    assert (after["status"], after["port"]) == ("stopped", first)
    assert after["status_message"] == (
        f"Start failed: Port {first} is taken by another process. No free port is left in {first}-{first}; "
        "ask an operator to widen STOCKROOM_PORT_RANGE."
    )


def test_a_backend_that_cannot_move_ports_fails_the_start_and_says_so(create, act, fake, monkeypatch):
    instance = create("redis")
    act(instance, "stop")
    fake.squatted.add(instance["port"])
    monkeypatch.setattr(fake, "moves_ports", False)
    after = act(instance, "start")
    assert (after["status"], after["port"]) == ("stopped", instance["port"])
    assert after["status_message"] == (
        f"Start failed: Port {instance['port']} is taken by another process, and the fake backend cannot move "
        "an instance to another port."
    )


def test_a_heal_moves_a_dead_server_off_a_squatted_port(create, fake, settings):
    settings.STOCKROOM_RESTART_BACKOFF = 0
    instance = create("redis")
    old = instance["port"]
    fake.kill(instance["id"])
    fake.squatted.add(old)

    reconcile()  # unhealthy, then healed at once
    healed = Instance.objects.get(pk=instance["id"])
    assert healed.status == "running" and healed.port != old
    assert healed.status_message == (
        f"Restarted after it stopped answering (attempt 1). Port {old} was taken by another process; "
        f"moved to {healed.port}."
    )
    assert fake.server(instance["id"]).port == healed.port


def test_a_create_whose_port_was_taken_before_the_worker_ran_moves(api, committed, fake):
    with committed():
        reserved = api.post("/api/storage/redis/instances", {}).json()
        fake.squatted.add(reserved["port"])  # after the request reserved it, before the worker runs
    instance = Instance.objects.get(pk=reserved["id"])
    assert instance.status == "running" and instance.port != reserved["port"]
    assert instance.status_message == (
        "Started; a login with the user's credentials succeeded. "
        f"Port {reserved['port']} was taken by another process; moved to {instance.port}."
    )
    assert fake.server(instance.pk).port == instance.port


def test_two_moved_instances_never_share_a_port(create, act, fake):
    one, two = create("redis"), create("redis")
    for instance in (one, two):
        act(instance, "stop")
        fake.squatted.add(instance["port"])
    ports = {act(instance, "start")["port"] for instance in (one, two)}
    assert len(ports) == 2 and not ports & {one["port"], two["port"]}
