"""4. The API under load: 10,000 instance rows, list pages and config over HTTP with 8 clients,
and the number of SQL queries per list request at two page sizes.

Each portal database gets its own child process (`python -m bench.api_load`, settings from the
environment the parent passes), its own empty database and its own gunicorn; the child prints
its results as JSON. The rows are inserted directly and never provisioned: their ports are not
real servers, and no worker runs. Models are imported inside functions: after django.setup().
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time

import django
from django.core.management import call_command

from . import stack
from .client import Api, in_parallel
from .report import summary

ROWS = 10_000
CLIENTS = 8
KIND = "redis"
LIST_PAGE_SIZES = (20, 100)


def seed(rows: int) -> tuple[str, list[int]]:
    """`rows` running instances of one user, in bulk; returns the user's token and the ids."""
    from django.contrib.auth import get_user_model

    from provisioning import crypto
    from provisioning.engines import get_engine
    from provisioning.models import Instance, Status
    from provisioning.services.tokens import create_token

    owner = get_user_model().objects.create_user("bench-load")
    password = crypto.generate_password()
    options = get_engine(KIND).clean_options({})
    Instance.objects.bulk_create(
        (
            Instance(
                owner=owner,
                kind=KIND,
                name=f"load-{index}",
                status=Status.RUNNING,
                backend="local",
                host="127.0.0.1",
                port=40000 + index,  # unique, as the live (host, port) constraint requires
                username="default",
                password=password,
                admin_password=password,
                options=options,
            )
            for index in range(rows)
        ),
        batch_size=500,
    )
    ids = list(Instance.objects.filter(owner=owner).values_list("pk", flat=True))
    settle()
    return create_token(owner=owner, name="bench-load")[1], ids


def settle() -> None:
    """Statistics and visibility as (auto)vacuum leaves them soon after a bulk insert, so the
    load runs against the steady state rather than the first minute after 10,000 inserts."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")


def queries_per_list(token: str) -> dict[str, int]:
    """SQL queries one list request runs, per page size, counted in-process (auth included)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from rest_framework.test import APIClient

    client = APIClient(HTTP_HOST="127.0.0.1")
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    client.get(f"/api/storage/{KIND}/instances?page_size=1")  # a token's first use this minute writes last_used
    counts = {}
    for size in LIST_PAGE_SIZES:
        with CaptureQueriesContext(connection) as queries:
            response = client.get(f"/api/storage/{KIND}/instances?page=3&page_size={size}")
        if response.status_code != 200 or len(response.json()["results"]) != size:
            raise RuntimeError(f"list with page_size={size} answered {response.status_code}")
        counts[str(size)] = len(queries)
    return counts


def hammer(token: str, paths: list[str]) -> dict:
    """GET every path, CLIENTS keep-alive clients at once; latency percentiles and throughput."""

    def client(share: list[str]) -> list[float]:
        api, latencies = Api(token), []
        for path in share:
            start = time.perf_counter()
            status, _ = api.request("GET", path)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}")
        api.close()
        return latencies

    start = time.perf_counter()
    shares = in_parallel(client, [paths[i::CLIENTS] for i in range(CLIENTS)], workers=CLIENTS)
    elapsed = time.perf_counter() - start
    return summary([s for share in shares for s in share]) | {"requests_per_second": round(len(paths) / elapsed, 1)}


def measure(requests: int) -> dict:
    """In the child: migrate an empty database, seed it, count queries, then load it over HTTP."""
    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    token, ids = seed(ROWS)
    chooser = random.Random(6)  # the same pages and ids in every run
    pages = ROWS // 20
    lists = [f"/api/storage/{KIND}/instances?page={chooser.randint(1, pages)}" for _ in range(requests)]
    configs = [f"/api/storage/{KIND}/instances/{chooser.choice(ids)}/config" for _ in range(requests)]
    results = {"rows": ROWS, "clients": CLIENTS, "queries_per_list": queries_per_list(token)}
    with stack.running(stack.web(dict(os.environ))):
        hammer(token, lists[: CLIENTS * 4] + configs[: CLIENTS * 4])  # warm both gunicorn workers up
        results["list"] = hammer(token, lists)
        results["config"] = hammer(token, configs)
    return results


def run(database_url: str, *, requests: int) -> dict:
    """In the parent: measure against `database_url` in a child process."""
    child = subprocess.run(
        [sys.executable, "-m", "bench.api_load", "--requests", str(requests)],
        cwd=stack.BASE_DIR,
        env=stack.environment(database_url=database_url),
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    )
    return json.loads(child.stdout)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, required=True, help="requests per endpoint")
    print(json.dumps(measure(parser.parse_args().requests)))
