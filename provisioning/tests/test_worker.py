"""The real thing: a Celery worker process and a Redis broker, as `make run` starts them."""

import pytest
import redis

from .conftest import instance_dir, port_refuses, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_real_worker_provisions_and_deletes(api, worker):
    created = [(kind, api.post(f"/api/storage/{kind}/instances", {}).json()["id"]) for kind in ("mysql", "redis")]
    for kind, pk in created:
        instance = wait_for_status(api, kind, pk, "running", "failed")
        assert instance["status"] == "running", instance["status_message"]
    redis_config = api.get(f"/api/storage/redis/instances/{created[1][1]}/config").json()
    client = redis.Redis(host=redis_config["host"], port=redis_config["port"], password=redis_config["password"])
    client.set("survives", "the worker")

    # Servers are detached: a worker restart does not take them down.
    worker.stop()
    assert client.get("survives") == b"the worker"
    worker.start()

    for kind, pk in created:
        assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    for kind, pk in created:
        wait_for_status(api, kind, pk, "gone")
        assert not instance_dir(kind, pk).exists()
    assert port_refuses(redis_config["port"])
