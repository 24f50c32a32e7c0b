"""The SQLite backend's writers queue on a lock file (portal/sqlite/base.py): a write transaction
holds it from BEGIN to COMMIT or ROLLBACK, and the next writer goes on when it is free. Each test
has a database file of its own (the alias WRITERS), whichever database the suite runs on."""

import fcntl
import os
import sqlite3
import stat
import threading
import warnings

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.db import connections, transaction
from django.db.backends.sqlite3 import base as django_sqlite
from django.db.utils import ConnectionHandler, OperationalError

WRITERS = "writers"
TIMEOUT = 2.0  # seconds a writer waits for the lock (the database's `timeout` option)


@pytest.fixture
def handler(tmp_path, django_db_blocker):
    """The connections (one per thread) to a new database of the test's own, as `handler[WRITERS]`."""
    database = {
        "ENGINE": "portal.sqlite",
        "NAME": str(tmp_path / "writers.sqlite3"),
        "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": TIMEOUT, "init_command": "PRAGMA journal_mode=WAL;"},
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
    with transaction.atomic(using=WRITERS):
        connection.cursor().execute("INSERT INTO notes VALUES ('kept')")
        assert not queue_is_free(handler)
    assert queue_is_free(handler)
    assert connection.cursor().execute("SELECT text FROM notes").fetchall() == [("kept",)]


def test_a_transaction_that_fails_leaves_the_queue(handler):
    connection = handler[WRITERS]
    with pytest.raises(ZeroDivisionError), transaction.atomic(using=WRITERS):
        connection.cursor().execute("INSERT INTO notes VALUES ('rolled back')")
        1 / 0  # noqa: B018
    assert queue_is_free(handler)
    assert connection.cursor().execute("SELECT count(*) FROM notes").fetchone() == (0,)


def test_a_begin_that_fails_leaves_the_queue(handler, monkeypatch):
    # Something outside the queue (the sqlite3 shell, say) holds SQLite's own write lock.
    outsider = sqlite3.connect(handler[WRITERS].settings_dict["NAME"], isolation_level=None)
    outsider.execute("BEGIN IMMEDIATE")
    monkeypatch.setitem(handler[WRITERS].settings_dict["OPTIONS"], "timeout", 0.05)
    handler[WRITERS].close()  # the next connection waits 0.05 s in SQLite's busy handler
    try:
        with pytest.raises(OperationalError), transaction.atomic(using=WRITERS):
            pass
        assert queue_is_free(handler)
    finally:
        outsider.rollback()
        outsider.close()


def test_reads_and_lone_statements_take_no_place_in_the_queue(handler):
    connection = handler[WRITERS]
    connection.cursor().execute("INSERT INTO notes VALUES ('autocommit')")
    read = []

    def reader():
        try:
            read.extend(handler[WRITERS].cursor().execute("SELECT text FROM notes").fetchall())
        finally:
            handler[WRITERS].close()

    other = threading.Thread(target=reader)
    with transaction.atomic(using=WRITERS):
        other.start()  # another connection reads while this one holds the queue
        other.join(timeout=10)
        assert read == [("autocommit",)]


def test_the_next_writer_waits_in_the_queue_not_in_sqlite_then_goes_on(handler, monkeypatch):
    began = []  # the threads that sent BEGIN to SQLite
    send_begin = django_sqlite.DatabaseWrapper._start_transaction_under_autocommit

    def begin(connection):
        began.append(threading.current_thread().name)
        send_begin(connection)

    monkeypatch.setattr(django_sqlite.DatabaseWrapper, "_start_transaction_under_autocommit", begin)
    entered, wrote = threading.Event(), []

    def second_writer():
        connection = handler[WRITERS]  # this thread's own connection
        try:
            with transaction.atomic(using=WRITERS):
                entered.set()
                wrote.append(connection.cursor().execute("SELECT text FROM notes").fetchall())
        finally:
            connection.close()

    with transaction.atomic(using=WRITERS):
        handler[WRITERS].cursor().execute("INSERT INTO notes VALUES ('first')")
        other = threading.Thread(target=second_writer, name="second")
        other.start()
        assert not entered.wait(0.3), "a second writer began while the first held the queue"
        assert began == ["MainThread"], "the second writer went to SQLite's lock, not the queue"
    other.join(timeout=10)
    assert began == ["MainThread", "second"]
    assert wrote == [[("first",)]]  # it began after the first had committed


def test_a_writer_gives_up_after_the_database_timeout(handler, monkeypatch):
    monkeypatch.setitem(handler[WRITERS].settings_dict["OPTIONS"], "timeout", 0.2)
    outcome = []

    def second_writer():
        try:
            with transaction.atomic(using=WRITERS):
                outcome.append("began")
        except OperationalError as exc:
            outcome.append(str(exc))
        finally:
            handler[WRITERS].close()

    with transaction.atomic(using=WRITERS):
        other = threading.Thread(target=second_writer)
        other.start()
        other.join(timeout=10)
    assert len(outcome) == 1 and outcome[0].startswith("database is locked"), outcome


def test_the_queue_file_is_the_portals_alone(handler):
    handler[WRITERS].close()
    os.unlink(handler[WRITERS].queue_path())
    umask = os.umask(0o022)  # a laxer umask than the portal's own: the file's mode is set, not inherited
    try:
        handler[WRITERS].ensure_connection()
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(os.stat(handler[WRITERS].queue_path()).st_mode)
    assert mode == 0o600, oct(mode)


def test_a_symlink_in_place_of_the_queue_file_is_refused(handler, tmp_path):
    handler[WRITERS].close()
    os.unlink(handler[WRITERS].queue_path())
    (tmp_path / "elsewhere").write_text("")
    os.symlink(tmp_path / "elsewhere", handler[WRITERS].queue_path())
    with pytest.raises(OSError):  # O_NOFOLLOW: ELOOP
        handler[WRITERS].ensure_connection()


def test_a_queue_file_of_another_user_is_refused(handler):
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    handler[WRITERS].close()
    os.chown(handler[WRITERS].queue_path(), 65534, 65534)
    with pytest.raises(ImproperlyConfigured, match="not a file of this user's"):
        handler[WRITERS].ensure_connection()


def test_closing_the_connection_mid_transaction_leaves_the_queue(handler):
    block = transaction.atomic(using=WRITERS)
    block.__enter__()
    try:
        assert not queue_is_free(handler)
        handler[WRITERS].close()
        assert queue_is_free(handler)
    finally:
        block.__exit__(None, None, None)


def test_a_forked_child_closing_its_copy_leaves_the_parents_lock(handler):
    with transaction.atomic(using=WRITERS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads about: the child only closes
            child = os.fork()
        if child == 0:  # the child: what a Celery pool process does with connections it inherits
            try:
                handler[WRITERS].close()
            finally:
                os._exit(0)
        assert os.waitpid(child, 0)[1] == 0
        assert not queue_is_free(handler)
    assert queue_is_free(handler)
