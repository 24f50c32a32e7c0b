from concurrent.futures import ThreadPoolExecutor

import pymysql
import pytest
import redis
from django.db import connection

from provisioning.engines.redis import NO_RETRY

from .conftest import client_for, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def test_ten_concurrent_creates_get_ten_distinct_working_ports(alice, api):
    kinds = ["redis", "mysql"] * 5

    def create(kind: str) -> tuple[str, int]:
        try:
            response = client_for(alice).post(f"/api/storage/{kind}/instances", {})
            assert response.status_code == 202, response.content
            return kind, response.json()["id"]
        finally:
            connection.close()  # each thread has its own database connection

    with ThreadPoolExecutor(max_workers=10) as pool:
        created = list(pool.map(create, kinds))

    ports = set()
    for kind, pk in created:
        instance = wait_for_status(api, kind, pk, "running", "failed")
        assert instance["status"] == "running", instance["status_message"]
        config = api.get(f"/api/storage/{kind}/instances/{pk}/config").json()
        ports.add(config["port"])
        if kind == "redis":
            assert redis.Redis(
                host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY
            ).ping()
        else:
            pymysql.connect(
                host=config["host"],
                port=config["port"],
                user=config["username"],
                password=config["password"],
                database=config["database"],
            ).close()
    assert len(ports) == 10

    for kind, pk in created:
        assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    for kind, pk in created:
        wait_for_status(api, kind, pk, "gone")
