"""Evacuating an unreachable instance (its node is out of reach) from its owner's page and from the
admin: the same service as the API (services/moves.py), over the fake fleet.

Personas: alice owns the instance; charlie is an outsider; vera is staff who may view instances;
carl is staff who may change them."""

import pytest

from provisioning.models import Instance, Snapshot, Status

from .conftest import admin_action, reconcile, web

pytestmark = pytest.mark.django_db

INSTANCES = "/admin/provisioning/instance/"


@pytest.fixture
def running(nodes, create, committed, api) -> dict:
    """alice's Redis on the fake fleet, with a key written before its snapshot and one after."""
    instance = create("redis")
    nodes.servers[instance["id"]].data["before"] = "1"
    with committed():
        answer = api.post(f"/api/storage/redis/instances/{instance['id']}/snapshots")
    assert answer.status_code == 202, answer.content
    assert Snapshot.objects.get(instance_id=instance["id"]).status == "ready"
    nodes.servers[instance["id"]].data["after"] = "2"
    return instance


def cut_off(nodes, instance: dict) -> Instance:
    """The instance's node stops answering, and a reconcile pass finds it unreachable."""
    node = next(node for node in nodes.fleet.values() if node.public_host == instance["host"])
    nodes.set_state(node.id, "down")
    nodes.kill(instance["id"])
    reconcile()
    found = Instance.objects.get(pk=instance["id"])
    assert found.status == Status.UNREACHABLE
    return found


def page_of(client, instance: dict) -> str:
    return client.get(f"/instances/{instance['id']}/").content.decode()


# The owner's page ------------------------------------------------------------------------------


def test_a_running_instance_offers_no_evacuation(running, alice):
    page = page_of(web(alice), running)
    assert 'data-action="evacuate"' not in page and 'id="cannot-evacuate"' not in page


def test_an_unreachable_instance_offers_evacuation_and_says_what_is_lost(running, nodes, alice):
    cut_off(nodes, running)
    snapshot = Snapshot.objects.get(instance_id=running["id"])
    when = f"{snapshot.created_at:%Y-%m-%d %H:%M:%S}"
    owner = web(alice)

    for text in (page_of(owner, running), owner.get(f"/instances/{running['id']}/panel/").content.decode()):
        assert f'<form method="post" action="/instances/{running["id"]}/evacuate/" id="evacuate"' in text
        assert 'data-action="evacuate">Evacuate</button>' in text
        assert "rebuilds it on another node from its last snapshot" in text
        assert f">{when}</time> UTC);\n      writes after that are lost." in text
        assert "csrfmiddlewaretoken" in text
        assert 'id="cannot-evacuate"' not in text


def test_without_a_ready_snapshot_the_page_says_why_it_cannot_be_evacuated(nodes, create, alice):
    instance = create("redis")
    cut_off(nodes, instance)

    page = page_of(web(alice), instance)

    assert 'data-action="evacuate"' not in page
    assert '<p id="cannot-evacuate">It cannot be evacuated to another node: It has no ready snapshot' in page


def test_evacuating_from_the_page_rebuilds_it_elsewhere_from_its_snapshot(running, nodes, committed, alice):
    old_host = cut_off(nodes, running).host
    owner = web(alice)

    with committed():
        answer = owner.post(f"/instances/{running['id']}/evacuate/", follow=True)

    assert answer.redirect_chain == [(f"/instances/{running['id']}/", 302)]
    assert "is being rebuilt on another node; the history says how it went." in answer.content.decode()
    instance = Instance.objects.get(pk=running["id"])
    assert instance.status == Status.RUNNING and instance.host != old_host
    assert "whatever was written after that is lost" in instance.status_message
    assert nodes.servers[running["id"]].data == {"before": "1"}, "what was written after the snapshot is lost"
    assert instance.events.filter(reason__contains=f"evacuation to another node was requested by {alice}").exists()


def test_an_evacuation_the_service_refuses_is_a_message_not_an_error(running, nodes, alice):
    owner = web(alice)
    answer = owner.post(f"/instances/{running['id']}/evacuate/", follow=True)
    assert answer.status_code == 200
    assert "Not evacuated: Cannot evacuate an instance that is running." in answer.content.decode()

    Snapshot.objects.filter(instance_id=running["id"]).delete()
    cut_off(nodes, running)
    answer = owner.post(f"/instances/{running['id']}/evacuate/", follow=True)
    assert answer.status_code == 200
    assert "Not evacuated: It has no ready snapshot to be rebuilt from" in answer.content.decode()
    assert Instance.objects.get(pk=running["id"]).status == Status.UNREACHABLE


def test_another_users_instance_cannot_be_evacuated_from_the_page(running, nodes, charlie):
    cut_off(nodes, running)
    outsider = web(charlie)
    assert outsider.post(f"/instances/{running['id']}/evacuate/").status_code == 404
    assert outsider.get(f"/instances/{running['id']}/").status_code == 404
    assert Instance.objects.get(pk=running["id"]).status == Status.UNREACHABLE
    assert nodes.called("rebuild") == []


def test_the_page_evacuates_only_by_post(running, nodes, alice):
    cut_off(nodes, running)
    assert web(alice).get(f"/instances/{running['id']}/evacuate/").status_code == 405
    assert Instance.objects.get(pk=running["id"]).status == Status.UNREACHABLE


# The admin -------------------------------------------------------------------------------------


def evacuate_in_admin(client, *instances: dict):
    return admin_action(client, "evacuate_instances", *instances)


def test_the_admin_evacuates_the_unreachable_ones_and_says_what_happened_to_each(
    running, nodes, create, committed, carl
):
    no_snapshot = create("redis")  # on the other node, which stays up
    elsewhere = next(node for node in nodes.fleet.values() if node.public_host == no_snapshot["host"])
    cut_off(nodes, running)
    Instance.objects.filter(pk=no_snapshot["id"]).update(status=Status.UNREACHABLE)  # its node comes back later
    healthy = create("redis")

    with committed():
        answer = evacuate_in_admin(web(carl), running, no_snapshot, healthy)

    text = answer.content.decode()
    assert answer.status_code == 200
    snapshot = Snapshot.objects.get(instance_id=running["id"])
    assert (
        f'<li class="success">Instance {running["name"]}: being rebuilt on another node from its snapshot of '
        f"{snapshot.created_at:%Y-%m-%d %H:%M:%S} UTC; writes after that are lost.</li>"
    ) in text
    assert f'<li class="error">Instance {no_snapshot["name"]}: It has no ready snapshot to be rebuilt from' in text
    assert f'<li class="warning">Instance {healthy["name"]}: skipped: it is running, not unreachable.</li>' in text
    assert Instance.objects.get(pk=running["id"]).status == Status.RUNNING
    assert Instance.objects.get(pk=running["id"]).host == elsewhere.public_host
    assert Instance.objects.get(pk=no_snapshot["id"]).status == Status.UNREACHABLE
    assert Instance.objects.get(pk=healthy["id"]).status == Status.RUNNING
    assert nodes.called("rebuild") == [running["id"]]


def test_staff_who_may_only_view_instances_cannot_evacuate(running, nodes, vera):
    cut_off(nodes, running)
    listing = web(vera).get(INSTANCES).content.decode()
    assert "evacuate_instances" not in listing

    answer = evacuate_in_admin(web(vera), running)

    assert answer.status_code == 200
    assert Instance.objects.get(pk=running["id"]).status == Status.UNREACHABLE
    assert nodes.called("rebuild") == []
