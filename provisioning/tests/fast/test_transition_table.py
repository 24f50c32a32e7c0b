"""The transition table: every move the services make is declared, and an undeclared one is refused
before the database is touched."""

import pytest

from provisioning.models import Instance, InstanceEvent, Status
from provisioning.services.actions import ACTIONS, DELETABLE
from provisioning.services.state import TRANSITIONS, IllegalTransition, Side, check_transition, transition

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("name", ACTIONS)
def test_every_action_is_declared_for_the_side_that_makes_it(name):
    spec = ACTIONS[name]
    check_transition(Side.REQUEST, spec.allowed_from, spec.busy)  # the owner asks
    check_transition(Side.WORKER, (spec.busy,), spec.done)  # a worker does it
    check_transition(Side.WORKER, (spec.busy,), Status.UNHEALTHY)  # or it fails and is left to healing
    for previous in spec.allowed_from:  # or it cannot be queued and is put back
        check_transition(Side.REQUEST, (spec.busy,), previous)


def test_deletes_and_healing_are_declared():
    check_transition(Side.REQUEST, DELETABLE, Status.DELETING)
    check_transition(Side.WORKER, (Status.DELETING,), Status.DELETED)
    check_transition(Side.HEALER, (Status.RUNNING,), Status.UNHEALTHY)
    check_transition(Side.HEALER, (Status.UNHEALTHY,), Status.RUNNING)
    check_transition(Side.HEALER, (Status.UNHEALTHY,), Status.FAILED)


@pytest.mark.parametrize(
    ("side", "frm", "to"),
    [
        (Side.REQUEST, Status.DELETED, Status.RUNNING),  # nothing comes back from deleted
        (Side.REQUEST, Status.PROVISIONING, Status.RUNNING),  # only a worker proves a login
        (Side.HEALER, Status.STOPPED, Status.RUNNING),  # the reconciler never starts what the owner stopped
        (Side.WORKER, Status.RUNNING, Status.DELETED),  # a delete always passes through deleting
        (Side.HEALER, Status.PROVISIONING, Status.FAILED),  # a create's outcome is its worker's
    ],
)
def test_an_undeclared_move_is_refused_before_anything_is_written(alice, side, frm, to):
    instance = Instance.objects.create(
        owner=alice, kind="redis", name="x", status=frm, backend="local", host="127.0.0.1", port=31999,
        username="default", password="p", admin_password="a",
    )  # fmt: skip
    assert to not in TRANSITIONS[side].get(frm, ())
    with pytest.raises(IllegalTransition):
        transition(instance, to, "should not happen", side=side, allowed_from=(frm,))
    instance.refresh_from_db()
    assert instance.status == frm
    assert not InstanceEvent.objects.filter(instance=instance).exists()


def test_deleted_is_final_for_every_side():
    for table in TRANSITIONS.values():
        assert Status.DELETED not in table
