"""Creates at once for the last place of a quota: the checks and the write they admit never
interleave (capacity.hold: PostgreSQL's row locks; SQLite's transactions, which begin IMMEDIATE)."""

import threading

import pytest
from django.db import connection

from .conftest import client_for
from .test_reconcile_pass import delete_what_each_test_made  # noqa: F401 - autouse: no instance outlives its test

pytestmark = pytest.mark.django_db(transaction=True)


def test_creates_at_once_never_both_take_the_last_place_of_the_quota(alice, settings):
    settings.STOCKROOM_QUOTA = 1
    clients = [client_for(alice) for _ in range(4)]
    start, answers = threading.Barrier(len(clients)), []

    def create(client) -> None:
        try:
            start.wait()
            answers.append(client.post("/api/storage/redis/instances", {}, format="json").status_code)
        finally:
            connection.close()  # each thread has its own database connection

    threads = [threading.Thread(target=create, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(answers) == [202, 403, 403, 403]
