"""4. The API at a realistic scale: 100,000 instance rows over 2,000 users, most of them deleted and
at most 10 live per user; a user's list, GET /config and the admin's filtered instance list over HTTP
with 8 clients, and the number of SQL queries per request at few rows and at many.

Each portal database gets its own child process (`python -m bench.api_load`, settings from the
environment the parent passes), its own empty database and its own gunicorn; the child prints
its results as JSON. The rows are inserted directly and never provisioned: their ports are not
real servers, and no worker runs. Models are imported inside functions: after django.setup().
"""

import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import time

import django
from django.core.management import call_command

from . import stack
from .client import in_parallel
from .report import summary

USERS = 2_000
ROWS_PER_USER = 50  # 100,000 rows
ROWS = USERS * ROWS_PER_USER
LIVE_MAX = 10  # user number u has 1 + u % 10 live Redis instances; the rest of its rows are deleted
CLIENTS = 8
KIND = "redis"
TOKENS = 200  # users the clients act as (one token each), chosen at random among all
ADMIN_FILTERS = ("status__exact=running", f"kind={KIND}")  # the admin's changelist, filtered
FEW = "status__exact=stopped"  # a filter that matches a handful of rows (20)


def seed() -> dict:
    """USERS users and their ROWS instances, in bulk; returns who is who, for the requests."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.hashers import make_password

    from provisioning import crypto
    from provisioning.engines import get_engine
    from provisioning.models import Instance, Status

    User = get_user_model()
    unusable = make_password(None)
    User.objects.bulk_create(
        (User(username=f"load-{number:04d}", password=unusable) for number in range(USERS)), batch_size=500
    )
    users = dict(User.objects.filter(username__startswith="load-").values_list("username", "pk"))
    password = crypto.generate_password()
    options = {kind: get_engine(kind).clean_options({}) for kind in ("mysql", "redis")}
    port = iter(range(20_000, 65_000))  # unique among live rows, as the (host, port) constraint requires

    def rows():
        for number in range(USERS):
            owner_id = users[f"load-{number:04d}"]
            live = 1 + number % LIVE_MAX
            for index in range(ROWS_PER_USER):
                deleted = index < ROWS_PER_USER - live  # the older ones
                kind = ("mysql" if index % 3 == 0 else "redis") if deleted else KIND
                stopped = not deleted and number % 100 == 0 and index == ROWS_PER_USER - 1  # 20 in all
                yield Instance(
                    owner_id=owner_id,
                    kind=kind,
                    name=f"load-{index}",
                    status=Status.DELETED if deleted else Status.STOPPED if stopped else Status.RUNNING,
                    holds_data=not deleted,
                    backend="local",
                    host="127.0.0.1",
                    port=next(port) if not deleted else 20_000 + index,
                    username="default",
                    password=password,
                    admin_password=password,
                    options=options[kind],
                )

    Instance.objects.bulk_create(rows(), batch_size=1000)
    settle()
    return users


def settle() -> None:
    """Statistics and visibility as (auto)vacuum leaves them soon after a bulk insert, so the
    load runs against the steady state rather than the first minute after 100,000 inserts."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")


def tokens(users: dict[str, int], chooser: random.Random) -> dict[int, str]:
    """A token for each of TOKENS users chosen at random (user 0 and 9 among them: 1 and 10 live)."""
    from django.contrib.auth import get_user_model

    from provisioning.services.tokens import create_token

    chosen = {users["load-0000"], users["load-0009"], *chooser.sample(sorted(users.values()), TOKENS - 2)}
    owners = get_user_model().objects.in_bulk(chosen)
    return {pk: create_token(owner=owners[pk], name="bench-load")[1] for pk in sorted(chosen)}


def admin_session() -> str:
    """A superuser's session cookie, as the admin's login leaves it."""
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.test import Client

    admin = get_user_model().objects.create_superuser("bench-admin", password=None)
    client = Client()
    client.force_login(admin)
    return f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"


def queries_per_request(users: dict[str, int], keys: dict[int, str], cookie: str) -> dict[str, dict[str, int]]:
    """SQL queries of one request (authentication included), counted in-process, at few rows and
    at many: a user with 1 live instance and one with 10; the admin's list filtered to 20 rows and
    to thousands."""
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from provisioning.models import Instance

    def count(path: str, **headers: str) -> int:
        client = Client(HTTP_HOST="127.0.0.1", **headers)
        client.get(path)  # a token's first use this minute writes last_used: not counted
        with CaptureQueriesContext(connection) as queries:
            response = client.get(path)
        if response.status_code != 200:
            raise RuntimeError(f"GET {path} answered {response.status_code}")
        return len(queries)

    counts: dict[str, dict[str, int]] = {"list": {}, "config": {}, "admin": {}}
    for username, label in (("load-0000", "1 instance"), ("load-0009", "10 instances")):
        owner = users[username]
        auth = {"HTTP_AUTHORIZATION": f"Token {keys[owner]}"}
        pk = Instance.objects.visible().filter(owner_id=owner).values_list("pk", flat=True)[0]
        counts["list"][label] = count(f"/api/storage/{KIND}/instances", **auth)
        counts["config"][label] = count(f"/api/storage/{KIND}/instances/{pk}/config", **auth)
    for query, label in ((FEW, "20 rows"), (ADMIN_FILTERS[0], "thousands of rows")):
        counts["admin"][label] = count(f"/admin/provisioning/instance/?{query}", HTTP_COOKIE=cookie)
    return counts


def hammer(requests: list[tuple[str, dict[str, str]]]) -> dict:
    """GET every (path, headers), CLIENTS keep-alive clients at once; latency percentiles and throughput."""

    def client(share: list[tuple[str, dict[str, str]]]) -> list[float]:
        connection, latencies = http.client.HTTPConnection("127.0.0.1", stack.WEB_PORT, timeout=30), []
        for path, headers in share:
            for attempt in range(2):  # once more if the server closed the kept-alive connection
                start = time.perf_counter()
                try:
                    connection.request("GET", path, headers=headers)
                    response = connection.getresponse()
                    response.read()
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                    connection.close()
                    if attempt:
                        raise
            latencies.append(time.perf_counter() - start)
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}")
        connection.close()
        return latencies

    start = time.perf_counter()
    shares = in_parallel(client, [requests[i::CLIENTS] for i in range(CLIENTS)], workers=CLIENTS)
    elapsed = time.perf_counter() - start
    return summary([s for share in shares for s in share]) | {"requests_per_second": round(len(requests) / elapsed, 1)}


def measure(requests: int) -> dict:
    """In the child: migrate an empty database, seed it, count queries, then load it over HTTP."""
    django.setup()
    from provisioning.models import Instance

    call_command("migrate", verbosity=0, interactive=False)
    started = time.perf_counter()
    users = seed()
    seeded = time.perf_counter() - started
    chooser = random.Random(6)  # the same users, pages and ids in every run
    keys = tokens(users, chooser)
    cookie = admin_session()
    results = {
        "rows": Instance.objects.count(),
        "users": USERS,
        "live": Instance.objects.visible().count(),
        "clients": CLIENTS,
        "seed_seconds": round(seeded, 1),
        "queries": queries_per_request(users, keys, cookie),
    }
    running = {}
    for owner, pk in Instance.objects.filter(owner_id__in=keys, status="running").values_list("owner_id", "pk"):
        running.setdefault(owner, []).append(pk)
    owners = sorted(running)

    def as_user(path: str, owner: int) -> tuple[str, dict[str, str]]:
        return path, {"Authorization": f"Token {keys[owner]}", "Accept": "application/json"}

    lists, configs = [], []
    for _ in range(requests):
        owner = chooser.choice(owners)
        lists.append(as_user(f"/api/storage/{KIND}/instances", owner))
        owner = chooser.choice(owners)
        configs.append(as_user(f"/api/storage/{KIND}/instances/{chooser.choice(running[owner])}/config", owner))
    admin = [
        (
            f"/admin/provisioning/instance/?{chooser.choice(ADMIN_FILTERS)}&p={chooser.randint(1, 20)}",
            {"Cookie": cookie},
        )
        for _ in range(max(requests // 4, CLIENTS * 4))
    ]
    with stack.running(stack.web(dict(os.environ))):
        # Let every token write its last_used (once a minute), one at a time, then warm both
        # gunicorn workers up.
        for path, headers in [as_user(f"/api/storage/{KIND}/instances", owner) for owner in owners]:
            connection = http.client.HTTPConnection("127.0.0.1", stack.WEB_PORT, timeout=30)
            connection.request("GET", path, headers=headers)
            if (status := connection.getresponse().status) != 200:
                raise RuntimeError(f"GET {path} answered {status}")
            connection.close()
        hammer(lists[: CLIENTS * 4] + configs[: CLIENTS * 4] + admin[: CLIENTS * 2])
        results["list"] = hammer(lists)
        results["config"] = hammer(configs)
        results["admin"] = hammer(admin)
    results["admin_paths"] = [f"/admin/provisioning/instance/?{query}&p=N" for query in ADMIN_FILTERS]
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
