"""The SQLite backend's writers queue on a lock file (portal/sqlite/base.py): a write transaction
holds it from BEGIN to COMMIT or ROLLBACK, and the next writer goes on when it is free. Each test
has a database file of its own (the alias WRITERS), whichever database the suite runs on."""

import fcntl
import os
import stat
import threading

import pytest
from django.db import connections, transaction
from django.db.utils import ConnectionHandler

WRITERS = "writers"


@pytest.fixture
def handler(tmp_path, django_db_blocker):
    """The connections (one per thread) to a new database of the test's own, as `handler[WRITERS]`."""
    database = {
        "ENGINE": "portal.sqlite",
        "NAME": str(tmp_path / "writers.sqlite3"),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"},
    }
    connections.settings[WRITERS] = ConnectionHandler({"default": database}).settings["default"]
    with django_db_blocker.unblock():
        try:
            connections[WRITERS].cursor().execute("CREATE TABLE notes (text TEXT)")
            yield connections
        finally:
            connections[WRITERS].close()
            del connections[WRITERS]
            del connections.settings[WRITERS]


def queue_is_free(handler) -> bool:
    """Whether another descriptor could take the writers' lock now."""
    descriptor = os.open(handler[WRITERS].queue_path(), os.O_RDWR)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)
    return True


def test_a_write_transaction_holds_the_queue_until_it_commits(handler):
    connection = handler[WRITERS]
    assert queue_is_free(handler)
    with transaction.atomic(using=connection.alias):
        connection.cursor().execute("INSERT INTO notes VALUES ('kept')")
        assert not queue_is_free(handler)
    assert queue_is_free(handler)
    assert connection.cursor().execute("SELECT text FROM notes").fetchall() == [("kept",)]


def test_a_transaction_that_fails_leaves_the_queue(handler):
    connection = handler[WRITERS]
    with pytest.raises(ZeroDivisionError), transaction.atomic(using=connection.alias):
        connection.cursor().execute("INSERT INTO notes VALUES ('rolled back')")
        1 / 0  # noqa: B018
    assert queue_is_free(handler)
    assert connection.cursor().execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_reads_and_lone_statements_take_no_place_in_the_queue(handler):
    connection = handler[WRITERS]
    connection.cursor().execute("INSERT INTO notes VALUES ('autocommit')")
    with transaction.atomic(using=connection.alias):
        pass  # an empty transaction queues too; this one is over
    read = []

    def reader():
        try:
            read.extend(handler[WRITERS].cursor().execute("SELECT text FROM notes").fetchall())
        finally:
            handler[WRITERS].close()

    other = threading.Thread(target=reader)
    with transaction.atomic(using=connection.alias):
        other.start()  # another connection reads while this one holds the queue
        other.join(timeout=10)
        assert read == [("autocommit",)]


def test_the_next_writer_waits_for_the_first_to_commit_then_goes_on(handler):
    first = handler[WRITERS]
    entered, wrote = threading.Event(), []

    def second_writer():
        connection = handler[WRITERS]  # this thread's own connection
        try:
            with transaction.atomic(using=connection.alias):
                entered.set()
                wrote.append(connection.cursor().execute("SELECT text FROM notes").fetchall())
        finally:
            connection.close()

    with transaction.atomic(using=first.alias):
        first.cursor().execute("INSERT INTO notes VALUES ('first')")
        other = threading.Thread(target=second_writer)
        other.start()
        assert not entered.wait(0.3), "a second writer began while the first held the queue"
    other.join(timeout=10)
    assert entered.is_set()
    assert wrote == [[("first",)]]  # it began after the first had committed


def test_the_queue_file_is_the_portals_alone(handler):
    handler[WRITERS].ensure_connection()
    mode = stat.S_IMODE(os.stat(handler[WRITERS].queue_path()).st_mode)
    assert mode & 0o077 == 0, oct(mode)


def test_closing_the_connection_mid_transaction_leaves_the_queue(handler):
    connection = handler[WRITERS]
    transaction.atomic(using=connection.alias).__enter__()
    assert not queue_is_free(handler)
    connection.close()
    assert queue_is_free(handler)
