"""The fleet's nodes in the admin and the API (services/fleet.py), over a fake backend that places
servers on nodes; and an instance whose node is out of reach, as its owner sees it.

Personas: alice owns instances; vera is staff who may view instances; carl is staff who may change
them; the anonymous caller and alice (not staff) get nothing."""

import pytest
from django.db.models import Sum
from django.test import Client
from rest_framework.test import APIClient

from provisioning.backends.base import BackendError, get_backend
from provisioning.backends.fake import FakeFleetBackend
from provisioning.models import Instance, Status
from provisioning.services import fleet

from ..conftest import client_for
from .conftest import LARGE, GiB, reconcile, staff, web

pytestmark = pytest.mark.django_db

NODES = "/admin/provisioning/instance/nodes/"
MANAGER_DOWN = "The swarm manager at tcp://10.9.0.1:2375 is not reachable (could not list its nodes)."


def reserved_on(host: str) -> int:
    return Instance.objects.reserving_memory().filter(host=host).aggregate(total=Sum("memory_reservation"))["total"]


# The rows ----------------------------------------------------------------------------------------


def test_each_node_shows_its_numbers_and_the_portals_instances_there(nodes, create, act, django_assert_num_queries):
    first, second, third = create("redis"), create("redis"), create("mysql")
    assert {first["host"], second["host"], third["host"]} == {"10.9.0.2", "db2.example.com"}, "placed by free memory"
    stopped = act(first, "stop")  # live, but reserves nothing while stopped
    assert stopped["status"] == "stopped"
    act(create("redis"), "delete")  # not live: counts nowhere

    with django_assert_num_queries(1):  # every backend's nodes, one query for the portal's side
        rows = {row.id: row for row in fleet.nodes()}

    assert [row.hostname for row in fleet.nodes()] == ["db-a", "db-b", "portal"]
    for row in rows.values():
        live = Instance.objects.live().filter(backend="fleet", host=row.public_host)
        assert row.instances == live.count()
        assert row.reserved == (reserved_on(row.public_host) or 0)
    assert sum(row.instances for row in rows.values()) == 3
    large = rows["n1large"]
    assert (large.backend, large.address, large.public_host, large.state, large.availability, large.labelled) == (
        "fleet", "10.9.0.3", "db2.example.com", "ready", "active", True,
    )  # fmt: skip
    assert large.memory == LARGE and large.reserved > 0
    assert rows["n2spare"] == fleet.NodeRow(
        backend="fleet", id="n2spare", hostname="portal", address="10.9.0.4", public_host="10.9.0.4",
        state="ready", availability="active", role="manager", labelled=False, memory=2 * GiB,
    )  # fmt: skip
    assert rows["n2spare"].memory_text == "0 bytes of 2.0 GiB"


def test_a_backend_that_does_not_place_servers_is_not_listed(settings, fake):
    settings.STOCKROOM_BACKENDS = {"fake": {"BACKEND": "provisioning.backends.fake.FakeBackend"}}
    assert fleet.nodes() == []


def test_a_manager_that_does_not_answer_is_an_error_row_and_the_other_backends_still_show(settings, nodes):
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "fleet2": {"BACKEND": "provisioning.backends.fake.FakeFleetBackend", "OPTIONS": {"second": True}},
    }
    other = get_backend("fleet2")
    other.reset()
    other.add_node("m0", address="10.8.0.2")
    nodes.fail_next("nodes", BackendError(MANAGER_DOWN))
    rows = fleet.nodes()
    assert rows[0] == fleet.NodeRow(backend="fleet", error=MANAGER_DOWN)
    assert [(row.backend, row.id) for row in rows[1:]] == [("fleet2", "m0")]


def test_pausing_a_node_sends_new_instances_elsewhere_and_activating_it_takes_them_again(nodes, carl, create, caplog):
    with caplog.at_level("INFO", logger="provisioning.services.fleet"):
        fleet.set_availability("fleet", "n1large", "pause", by=carl)
    assert "Node n1large (db-b) of backend fleet set to pause by carl" in caplog.text, "who did it is logged"
    assert nodes.fleet["n1large"].availability == "pause"
    assert create("redis")["host"] == "10.9.0.2"
    assert create("redis")["host"] == "10.9.0.2", "the larger node has more free, but is paused"
    row = fleet.set_availability("fleet", "n1large", "active", by=carl)
    assert row.availability == "active" and row.instances == 0
    assert create("redis")["host"] == "db2.example.com"


def test_a_node_is_set_active_or_paused_only(nodes, carl):
    with pytest.raises(ValueError, match="active or pause"):
        fleet.set_availability("fleet", "n1large", "drain", by=carl)
    assert nodes.fleet["n1large"].availability == "active"


def test_a_drain_pauses_the_node_and_moves_each_running_instance_with_its_data(nodes, create, committed, carl):
    first, second = create("redis"), create("redis")  # on the large node, then the small one
    assert first["host"] == "db2.example.com"
    nodes.servers[first["id"]].data["key"] = "value"
    api = APIClient()
    api.force_authenticate(carl)

    with committed():
        response = api.post("/api/fleet/nodes/n1large/drain")

    assert response.status_code == 200, response.content
    assert response.json()["availability"] == "pause"
    assert "moving its 1 running instances" in response.json()["detail"]
    moved = Instance.objects.get(pk=first["id"])
    assert (moved.status, moved.host) == (Status.RUNNING, "10.9.0.2")
    assert moved.port != second["port"], "ports are unique per host"
    assert moved.status_message.startswith(f"Moved from db2.example.com:{first['port']} to 10.9.0.2:{moved.port}")
    assert moved.timings["move_pause"] == 0.25
    assert nodes.servers[first["id"]].data == {"key": "value"}
    assert nodes.servers[first["id"]].port == moved.port
    assert moved.events.filter(type="instance.moved").count() == 1
    assert Instance.objects.get(pk=second["id"]).host == "10.9.0.2", "the other one stays where it was"


def test_a_move_that_fails_leaves_the_instance_running_where_it_was(nodes, create, committed, carl):
    first = create("redis")
    nodes.fail_next("move", BackendError("The job could not reach the portal."))

    with committed():
        fleet.act("fleet", "n1large", "drain", by=carl)

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host, instance.port) == (Status.RUNNING, first["host"], first["port"])
    assert "The move failed; it runs on its old node again" in instance.status_message
    assert "could not reach the portal" in instance.status_message
    assert not instance.events.filter(type="instance.moved").exists()


def test_a_drain_with_no_room_elsewhere_moves_nothing_and_says_so(nodes, create, committed, carl):
    nodes.set_availability("n0small", "pause")
    first = create("redis")

    with committed():
        fleet.act("fleet", "n1large", "drain", by=carl)

    instance = Instance.objects.get(pk=first["id"])
    assert (instance.status, instance.host) == (Status.RUNNING, first["host"])
    assert (
        instance.status_message == "Not moved: No other node takes instances now (ready, active and labelled for them)."
    )


def test_stopped_instances_stay_on_a_drained_node_and_the_operator_is_told(nodes, create, act, carl):
    first = create("redis")
    act(first, "stop")

    _row, said = fleet.act("fleet", "n1large", "drain", by=carl)

    assert "moving its 0 running instances" in said and "1 others (stopped or busy) stay on it" in said
    assert Instance.objects.get(pk=first["id"]).host == first["host"]


def test_evacuate_is_only_for_an_unreachable_instance_with_a_snapshot(nodes, create, alice):
    first = create("redis")
    api = APIClient()
    api.force_authenticate(alice)
    url = f"/api/storage/redis/instances/{first['id']}/evacuate"

    running = api.post(url)
    assert running.status_code == 409 and running.json()["status"] == "running"

    nodes.set_state("n1large", "down")
    nodes.kill(first["id"])
    reconcile()
    assert Instance.objects.get(pk=first["id"]).status == Status.UNREACHABLE
    no_snapshot = api.post(url)
    assert no_snapshot.status_code == 409
    assert "no ready snapshot" in no_snapshot.json()["detail"]


# The API -----------------------------------------------------------------------------------------


def test_the_api_lists_the_nodes_to_staff(nodes, vera, create):
    create("redis")
    answer = client_for(vera).get("/api/fleet/nodes")
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["unavailable"] == []
    assert [node["id"] for node in body["nodes"]] == ["n0small", "n1large", "n2spare"]
    large = body["nodes"][1]
    assert large == {
        "backend": "fleet", "id": "n1large", "hostname": "db-b", "address": "10.9.0.3",
        "public_host": "db2.example.com", "state": "ready", "availability": "active", "role": "worker",
        "labelled": True, "memory": LARGE, "reserved": reserved_on("db2.example.com"), "instances": 1,
    }  # fmt: skip


def test_only_staff_who_may_change_instances_pause_or_activate_a_node_through_the_api(nodes, alice, vera, carl):
    anonymous = APIClient()
    for method, url in [("get", "/api/fleet/nodes"), ("post", "/api/fleet/nodes/n1large/pause")]:
        assert getattr(anonymous, method)(url).status_code == 401, url
        assert getattr(client_for(alice), method)(url).status_code == 403, url
    assert client_for(vera).post("/api/fleet/nodes/n1large/pause").status_code == 403, "vera may only look"
    assert nodes.fleet["n1large"].availability == "active"

    answer = client_for(carl).post("/api/fleet/nodes/n1large/pause")
    assert answer.status_code == 200, answer.content
    assert answer.json()["availability"] == "pause"
    assert nodes.fleet["n1large"].availability == "pause"
    assert client_for(carl).post("/api/fleet/nodes/n1large/activate").json()["availability"] == "active"
    assert nodes.fleet["n1large"].availability == "active"


@pytest.mark.parametrize(
    ("codenames", "may_look", "may_act"),
    [
        ((), False, False),
        (("view_instance",), True, False),
        (("change_instance",), True, True),  # as in the admin, who may change may look
        (("view_instance", "change_instance"), True, True),
        (("view_snapshot", "change_snapshot", "delete_instance"), False, False),  # not the instance permissions
    ],
)
def test_the_api_asks_staff_for_the_permissions_the_admins_nodes_page_asks(
    nodes, django_user_model, codenames, may_look, may_act
):
    api = client_for(staff(django_user_model, "sam", *codenames))

    listing = api.get("/api/fleet/nodes")
    assert listing.status_code == (200 if may_look else 403), listing.content
    answer = api.post("/api/fleet/nodes/n1large/pause")
    assert answer.status_code == (200 if may_act else 403), answer.content
    assert nodes.fleet["n1large"].availability == ("pause" if may_act else "active")

    page = web(staff(django_user_model, "sam-web", *codenames)).get(NODES)
    assert page.status_code == (200 if may_look else 403), "the admin's page answers alike"


def test_the_api_answers_404_for_an_unknown_node_or_action(nodes, carl):
    api = client_for(carl)
    answer = api.post("/api/fleet/nodes/n9gone/pause")
    assert answer.status_code == 404
    assert "n9gone" in answer.json()["detail"]
    assert api.post("/api/fleet/nodes/n1large/evict").status_code == 404, "evict is not an action"
    assert nodes.called("set_availability") == []


def test_a_backend_error_is_a_503_with_its_message(nodes, carl):
    api = client_for(carl)
    nodes.fail_next("set_availability", BackendError("The swarm could not change the node: update out of sequence"))
    answer = api.post("/api/fleet/nodes/n1large/pause")
    assert answer.status_code == 503
    assert answer.json() == {"detail": "The swarm could not change the node: update out of sequence"}

    nodes.fail_next("nodes", BackendError(MANAGER_DOWN))
    answer = api.post("/api/fleet/nodes/n1large/pause")
    assert answer.status_code == 503 and MANAGER_DOWN in answer.json()["detail"]

    nodes.fail_next("nodes", BackendError(MANAGER_DOWN))
    listing = api.get("/api/fleet/nodes")
    assert listing.status_code == 200
    assert listing.json() == {"nodes": [], "unavailable": [{"backend": "fleet", "detail": MANAGER_DOWN}]}


def test_the_schema_has_the_fleet_endpoints(client):
    paths = client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()["paths"]
    assert set(paths["/api/fleet/nodes/"]) == {"get"}
    action = paths["/api/fleet/nodes/{node_id}/{action}/"]["post"]
    assert set(action["responses"]) == {"200", "403", "404", "503"}
    assert set(paths["/api/fleet/nodes/"]["get"]["responses"]) == {"200", "403"}
    parameter = next(p for p in action["parameters"] if p["name"] == "action")
    assert parameter["schema"]["enum"] == ["activate", "drain", "pause"]


# The admin ---------------------------------------------------------------------------------------


def test_the_admin_page_needs_staff_who_may_view_instances(nodes, alice, django_user_model):
    assert Client().get(NODES).status_code == 302, "anonymous: to the admin's sign-in"
    assert web(alice).get(NODES).status_code == 302, "not staff: to the admin's sign-in"
    assert web(staff(django_user_model, "nora")).get(NODES).status_code == 403, "staff without the permission"


def test_view_only_staff_see_the_nodes_without_buttons_and_cannot_post(nodes, vera, create):
    create("redis")
    page = web(vera).get(NODES)
    assert page.status_code == 200
    text = page.content.decode()
    for shown in ("db-b", "10.9.0.3", "db2.example.com", "ready", "active", "MiB of 4.0 GiB"):
        assert shown in text, shown
    assert 'data-action="pause"' not in text and 'data-action="activate"' not in text
    answer = web(vera).post(NODES, {"backend": "fleet", "node": "n1large", "action": "pause"})
    assert answer.status_code == 403
    assert nodes.fleet["n1large"].availability == "active"


def test_staff_who_may_change_instances_pause_and_activate_with_a_message(nodes, carl):
    client = web(carl)
    text = client.get(NODES).content.decode()
    assert text.count('data-action="pause"') == 3 and 'data-action="activate"' not in text
    assert "csrfmiddlewaretoken" in text

    answer = client.post(NODES, {"backend": "fleet", "node": "n1large", "action": "pause"}, follow=True)
    assert nodes.fleet["n1large"].availability == "pause"
    assert "Node db-b (fleet) is pause: it takes no new instances." in answer.content.decode()
    assert answer.content.decode().count('data-action="activate"') == 1

    answer = client.post(NODES, {"backend": "fleet", "node": "n1large", "action": "activate"}, follow=True)
    assert nodes.fleet["n1large"].availability == "active"
    assert "is active: it takes new instances." in answer.content.decode()


def test_the_admin_needs_the_csrf_token(nodes, carl):
    client = Client(enforce_csrf_checks=True)
    client.force_login(carl)
    assert client.post(NODES, {"backend": "fleet", "node": "n1large", "action": "pause"}).status_code == 403
    assert nodes.fleet["n1large"].availability == "active"


def test_the_admin_says_why_an_action_or_a_listing_failed(nodes, carl):
    client = web(carl)
    answer = client.post(NODES, {"backend": "fleet", "node": "n9gone", "action": "pause"}, follow=True)
    assert answer.status_code == 200
    assert "Could not pause node n9gone: Backend fleet has no node n9gone." in answer.content.decode()
    assert client.post(NODES, {"backend": "fleet", "node": "n1large", "action": "evict"}).status_code == 400
    assert nodes.fleet["n1large"].availability == "active"

    nodes.fail_next("nodes", BackendError(MANAGER_DOWN))
    page = client.get(NODES)
    assert page.status_code == 200
    assert f"Backend fleet: {MANAGER_DOWN}" in page.content.decode()


def test_the_instance_list_links_to_the_nodes_only_when_a_backend_places(settings, fake, carl):
    settings.STOCKROOM_BACKENDS = {"fake": {"BACKEND": "provisioning.backends.fake.FakeBackend"}}
    assert 'id="nodes-link"' not in web(carl).get("/admin/provisioning/instance/").content.decode()
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "fleet": {"BACKEND": FakeFleetBackend.__module__ + ".FakeFleetBackend"},
    }
    page = web(carl).get("/admin/provisioning/instance/").content.decode()
    assert f'<a href="{NODES}" id="nodes-link">Nodes</a>' in page


# The owner's page --------------------------------------------------------------------------------


def test_an_instance_on_a_node_out_of_reach_shows_it_plainly_and_comes_back(nodes, create, alice):
    instance = create("redis")
    node = next(node for node in nodes.fleet.values() if node.public_host == instance["host"])
    nodes.set_state(node.id, "down")
    nodes.kill(instance["id"])  # the probe finds nothing answering there
    reconcile()
    assert Instance.objects.get(pk=instance["id"]).status == Status.UNREACHABLE

    owner = web(alice)
    page = owner.get(f"/instances/{instance['id']}/").content.decode()
    panel = owner.get(f"/instances/{instance['id']}/panel/").content.decode()
    for text in (page, panel):
        assert '<span class="badge unreachable" id="status">unreachable</span>' in text
        assert f"its node {node.hostname} is not ready in the swarm (down)" in text
        assert 'id="unreachable"' in text and "returns, as it was, when the host does" in text
        assert 'data-busy="true"' in text, "the page follows it until it is back"
        assert node.id not in text, "a user never sees a node's id"
    assert ".badge.unreachable" in open("static/stockroom.css").read()

    nodes.set_state(node.id, "ready")
    nodes.servers[instance["id"]].running = True
    reconcile()
    panel = owner.get(f"/instances/{instance['id']}/panel/").content.decode()
    assert '<span class="badge running" id="status">running</span>' in panel
    assert 'id="unreachable"' not in panel and 'data-busy="false"' in panel


def test_a_create_when_the_manager_does_not_answer_is_a_503_that_says_so(nodes, api):
    nodes.fail_next("nodes", BackendError(MANAGER_DOWN))

    response = api.post("/api/storage/redis/instances", {})

    assert response.status_code == 503
    assert response.json()["detail"] == MANAGER_DOWN
    assert not Instance.objects.exists()


def test_a_create_with_no_room_on_any_node_is_a_503_that_says_so(nodes, api):
    for node_id in ("n0small", "n1large"):
        nodes.set_availability(node_id, "pause")

    response = api.post("/api/storage/redis/instances", {})

    assert response.status_code == 503
    assert "No node has room" in response.json()["detail"]
    assert not Instance.objects.exists()


def test_a_backend_that_gives_each_instance_two_ports_hands_out_every_other_one(nodes, create, settings, monkeypatch):
    """The swarm gives each instance its port and the next (Redis serves the portal's TLS there), so
    no instance may be given a port right after another's."""
    monkeypatch.setattr(nodes, "ports_per_instance", 2)
    first_port = settings.STOCKROOM_PORT_RANGE[0]
    nodes.set_availability("n0small", "pause")  # all on one node
    ports = [create("redis")["port"] for _ in range(3)]
    assert ports == [first_port, first_port + 2, first_port + 4]


def test_a_port_next_to_an_instance_that_holds_two_is_never_given(nodes, create, settings, monkeypatch):
    """An instance made before its backend held two ports (or under another range) may sit on an odd
    offset: the ports after it stay its own, and a new instance steps over them."""
    first_port = settings.STOCKROOM_PORT_RANGE[0]
    nodes.set_availability("n0small", "pause")  # all on one node
    old = create("redis")
    Instance.objects.filter(pk=old["id"]).update(port=first_port + 3)  # as if made so
    nodes.servers[old["id"]].port = first_port + 3
    monkeypatch.setattr(nodes, "ports_per_instance", 2)
    ports = [create("redis")["port"] for _ in range(2)]
    assert ports == [first_port, first_port + 6], "first_port + 2 would hold first_port + 3, which is taken"
