"""Moving one running instance to another node, an operator's action: from the admin and through
the API (services/moves.py), over the fake fleet.

Personas: alice owns instances; charlie is an outsider; vera is staff who may view instances;
carl is staff who may change them. Owners cannot ask for a move: where a server runs is the
operators' choice."""

from dataclasses import replace

import pytest
from rest_framework.test import APIClient

from provisioning import services
from provisioning.models import Instance, Status

from ..conftest import client_for
from .conftest import GiB, admin_action, web

pytestmark = pytest.mark.django_db

INSTANCES = "/admin/provisioning/instance/"


def move_in_admin(client, *instances: dict):
    return admin_action(client, "move_instances", *instances)


# The admin -------------------------------------------------------------------------------------


def test_the_admin_moves_the_running_ones_with_their_data_and_says_what_happened_to_each(
    nodes, create, act, committed, carl
):
    first, stopped = create("redis"), create("redis")  # on the large node, then the small one
    nodes.servers[first["id"]].data["key"] = "value"
    act(stopped, "stop")

    with committed():
        answer = move_in_admin(web(carl), first, stopped)

    text = answer.content.decode()
    assert answer.status_code == 200
    assert (
        f'<li class="success">Instance {first["name"]}: moving to the node with the most room, with its data; '
        "its writes pause while it moves.</li>"
    ) in text
    assert f'<li class="warning">Instance {stopped["name"]}: skipped: it is stopped, not running.</li>' in text
    moved = Instance.objects.get(pk=first["id"])
    assert (moved.status, moved.host) == (Status.RUNNING, "10.9.0.2")
    assert nodes.servers[first["id"]].data == {"key": "value"}
    assert moved.events.filter(type="instance.moved").count() == 1
    assert moved.events.filter(reason="A move to another node was requested by carl.").exists()
    assert Instance.objects.get(pk=stopped["id"]).host == stopped["host"]
    assert nodes.called("move") == [first["id"]]


def test_a_move_goes_to_another_node_even_when_its_own_has_the_most_room(nodes, create, committed, carl):
    first = create("redis")  # on the large node
    nodes.fleet["n1large"] = replace(nodes.fleet["n1large"], memory=8 * GiB)  # still by far the roomiest

    with committed():
        move_in_admin(web(carl), first)

    moved = Instance.objects.get(pk=first["id"])
    assert (moved.status, moved.host) == (Status.RUNNING, "10.9.0.2"), moved.status_message


def test_a_move_with_no_room_elsewhere_leaves_it_where_it_was_and_says_so(nodes, create, committed, carl):
    nodes.set_availability("n0small", "pause")
    first = create("redis")

    with committed():
        move_in_admin(web(carl), first)

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host) == (Status.RUNNING, first["host"])
    assert (
        instance.status_message == "Not moved: No other node takes instances now (ready, active and labelled for them)."
    )

    nodes.set_availability("n0small", "active")
    nodes.fleet["n0small"] = replace(nodes.fleet["n0small"], memory=1)  # takes instances, has no room
    with committed():
        move_in_admin(web(carl), first)
    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host) == (Status.RUNNING, first["host"])
    assert instance.status_message == "Not moved: No node has room for it."  # what the backend said


def test_staff_who_may_only_view_instances_cannot_move_them(nodes, create, vera):
    first = create("redis")
    assert 'value="move_instances"' not in web(vera).get(INSTANCES).content.decode()

    answer = move_in_admin(web(vera), first)

    assert answer.status_code == 200
    assert Instance.objects.get(pk=first["id"]).status == Status.RUNNING
    assert nodes.called("move") == []


def test_move_and_evacuate_are_offered_only_when_a_backend_places_servers(settings, nodes, carl):
    offered = web(carl).get(INSTANCES).content.decode()
    assert 'value="move_instances"' in offered and 'value="evacuate_instances"' in offered

    settings.STOCKROOM_BACKENDS = {"fake": {"BACKEND": "provisioning.backends.fake.FakeBackend"}}
    settings.STOCKROOM_DEFAULT_BACKEND = "fake"
    offered = web(carl).get(INSTANCES).content.decode()
    assert 'value="move_instances"' not in offered and 'value="evacuate_instances"' not in offered
    assert 'value="restart_instances"' in offered


# The API ---------------------------------------------------------------------------------------


def move_url(instance: dict) -> str:
    return f"/api/storage/{instance['kind']}/instances/{instance['id']}/move"


def test_staff_who_may_change_instances_move_anyones_through_the_api(nodes, create, committed, carl):
    first = create("redis")  # alice's, on the large node
    nodes.servers[first["id"]].data["key"] = "value"

    with committed():
        answer = client_for(carl).post(move_url(first))

    assert answer.status_code == 202, answer.content
    assert answer.json()["status"] == "moving" and answer.json()["id"] == first["id"]
    moved = Instance.objects.get(pk=first["id"])
    assert (moved.status, moved.host) == (Status.RUNNING, "10.9.0.2")
    assert moved.status_message.startswith(f"Moved from db2.example.com:{first['port']} to 10.9.0.2:{moved.port}")
    assert nodes.servers[first["id"]].data == {"key": "value"}
    assert moved.events.filter(reason="A move to another node was requested by carl.").exists()


def test_owners_and_outsiders_cannot_move_an_instance(nodes, create, alice, charlie, vera):
    alices = create("redis")
    veras = client_for(vera).post("/api/storage/redis/instances", {})
    assert veras.status_code == 202, veras.content

    assert APIClient().post(move_url(alices)).status_code == 401
    assert client_for(alice).post(move_url(alices)).status_code == 403, "her own: she may see it, not move it"
    assert client_for(charlie).post(move_url(alices)).status_code == 404, "another's does not exist for him"
    assert client_for(vera).post(move_url(alices)).status_code == 404, "staff who may only view: not another's"
    own = client_for(vera).post(f"/api/storage/redis/instances/{veras.json()['id']}/move")
    assert own.status_code == 403
    assert own.json()["detail"] == "Only staff who may change instances move one to another node."
    assert Instance.objects.filter(status=Status.MOVING).count() == 0
    assert nodes.called("move") == []


def test_a_move_the_service_refuses_is_a_409_that_says_why(settings, nodes, create, act, carl):
    first = create("redis")
    act(first, "stop")
    stopped = client_for(carl).post(move_url(first))
    assert stopped.status_code == 409
    assert stopped.json() == {"detail": "Cannot move an instance that is stopped.", "status": "stopped"}

    settings.STOCKROOM_DEFAULT_BACKEND = "fake"  # one host: nowhere to go
    single = create("redis")
    answer = client_for(carl).post(move_url(single))
    assert answer.status_code == 409
    assert answer.json() == {"detail": "The fake backend runs every server on one host: there is nowhere to move to."}
    assert Instance.objects.get(pk=single["id"]).status == Status.RUNNING


def test_the_schema_has_the_move_endpoint(client):
    paths = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["paths"]
    move = paths["/api/storage/{kind}/instances/{id}/move/"]["post"]
    assert set(move["responses"]) == {"202", "403", "404", "409"}
    assert "Staff who may change instances only" in move["description"]


# A worker that dies mid-move ----------------------------------------------------------------------


class WorkerDied(BaseException):
    """What a SIGKILL does to the move: nothing after it runs, not even its own clean-up."""


def die_moving(nodes, create, committed, carl, *, after_move: bool):
    """A running instance with data, and a move whose worker dies: before the server moved, or just
    after it did (its new server answering). The instance as the dead worker left it."""
    first = create("redis")
    nodes.servers[first["id"]].data["key"] = "value"
    if after_move:
        move = type(nodes).move

        def moved_then_died(self, instance, source, spool):
            move(self, instance, source, spool)
            raise WorkerDied

        nodes.move = moved_then_died.__get__(nodes)
    else:
        nodes.fail_next("move", WorkerDied())
    with pytest.raises(WorkerDied), committed():
        move_in_admin(web(carl), first)
    left = Instance.objects.get(pk=first["id"])
    assert left.status == Status.MOVING and left.move_source == [first["host"], first["port"]]
    return first, left


def test_a_move_whose_worker_died_before_the_server_moved_is_put_back_with_its_data(nodes, create, committed, carl):
    first, left = die_moving(nodes, create, committed, carl, after_move=False)
    assert left.host != first["host"]

    services.recover(first["id"])

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host, instance.port) == (Status.RUNNING, first["host"], first["port"])
    assert instance.status_message == (
        "The worker handling it stopped during a move; it runs where it was again, with its data."
    )
    assert instance.move_source is None
    assert nodes.servers[first["id"]].data == {"key": "value"}
    assert nodes.servers[first["id"]].port == first["port"]
    assert nodes.called("end_move") == [first["id"]]


def test_a_move_whose_worker_died_after_the_server_moved_is_finished_where_it_went(nodes, create, committed, carl):
    first, left = die_moving(nodes, create, committed, carl, after_move=True)

    services.recover(first["id"])

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host, instance.port) == (Status.RUNNING, left.host, left.port)
    assert instance.status_message.startswith("The worker handling it stopped, but the move had finished: moved from ")
    assert instance.move_source is None
    assert instance.events.filter(type="instance.moved").count() == 1
    assert nodes.servers[first["id"]].data == {"key": "value"}


def test_a_move_whose_worker_died_before_it_began_is_left_to_the_reconciler(nodes, create, committed, carl):
    first = create("redis")
    Instance.objects.filter(pk=first["id"]).update(status=Status.MOVING)  # asked, not begun

    services.recover(first["id"])

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host) == (Status.UNHEALTHY, first["host"])
    assert instance.status_message == "The worker handling it stopped during a move; the move was given up."
    assert nodes.called("end_move") == []


def test_a_move_whose_new_server_was_made_is_kept_even_when_it_does_not_answer(nodes, create, committed, carl):
    """Its new server may have taken writes: the move is never undone then. It stays unhealthy where
    it went, and the reconciler starts it there."""
    first, left = die_moving(nodes, create, committed, carl, after_move=True)
    nodes.kill(first["id"])  # crashed after it took writes

    services.recover(first["id"])

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host, instance.port) == (Status.UNHEALTHY, left.host, left.port)
    assert "after its new server on" in instance.status_message and "stays there" in instance.status_message
    assert instance.move_source is None
    assert nodes.called("end_move") == [], "nothing is removed on either host"
