"""The host's memory budget, against real servers: a create that does not fit is refused before
anything is made."""

import pytest
import redis
from django.conf import settings

from provisioning.backends.base import get_backend
from provisioning.backends.local import processes_under
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance

from .conftest import instance_dir, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024**2


def next_port() -> int:
    """The port a create would take now: the lowest in range that no live instance holds and is free."""
    held = set(Instance.objects.live().values_list("port", flat=True))
    first, last = settings.STOCKROOM_PORT_RANGE
    return next(port for port in range(first, last + 1) if port not in held and get_backend().port_is_free(port))


def folders(kind: str) -> set[str]:
    root = settings.STOCKROOM_INSTANCES_DIR / kind
    return {path.name for path in root.iterdir()} if root.exists() else set()


def test_a_create_beyond_the_budget_gets_503_and_leaves_nothing_behind(api, settings):
    settings.STOCKROOM_MEMORY_BUDGET = 100 * MiB  # room for one default Redis (80 MiB), not two
    first = api.post("/api/storage/redis/instances", {"name": "first"}).json()
    first = wait_for_status(api, "redis", first["id"], "running", "failed")
    assert first["status"] == "running", first["status_message"]
    assert first["memory_reservation"] == 80 * MiB
    before = {"rows": Instance.objects.count(), "folders": folders("redis")}
    servers = processes_under(settings.STOCKROOM_INSTANCES_DIR)
    port = next_port()

    response = api.post("/api/storage/redis/instances", {"name": "second"})

    assert response.status_code == 503
    assert response.json()["detail"].startswith(
        "The host has no room for a new Redis instance: it needs 80 MiB of memory, and instances reserve "
        "80 MiB of the host's 100 MiB budget."
    )
    assert {"rows": Instance.objects.count(), "folders": folders("redis")} == before, "no row, no folder"
    assert list(Instance.objects.live().values_list("name", "port")) == [("first", first["port"])], "no port held"
    assert processes_under(settings.STOCKROOM_INSTANCES_DIR) == servers, "no server started"
    config = api.get(f"/api/storage/redis/instances/{first['id']}/config").json()
    assert redis.Redis(port=config["port"], password=config["password"], retry=NO_RETRY).ping(), "the first is fine"

    # With room, the same request succeeds and gets the port the refused one would have had.
    settings.STOCKROOM_MEMORY_BUDGET = 200 * MiB
    second = api.post("/api/storage/redis/instances", {"name": "second"}).json()
    second = wait_for_status(api, "redis", second["id"], "running", "failed")
    assert second["status"] == "running", second["status_message"]
    assert second["port"] == port
    assert instance_dir("redis", second["id"]).exists()

    for instance in (first, second):
        assert api.delete(f"/api/storage/redis/instances/{instance['id']}").status_code == 202
        wait_for_status(api, "redis", instance["id"], "gone")
