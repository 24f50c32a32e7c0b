"""Django's SQLite backend, with write transactions that queue instead of sleeping.

SQLite lets one transaction write at a time. One that finds the lock taken sleeps and tries
again, each sleep longer than the last (SQLite's busy handler: 1, 2, 5, 10, 15, 20, 25 … up to
100 ms), so a transaction may sleep 25 ms for a lock freed after 2. Under eight creates at once
most of each create's time went on such sleeps.

Here a write transaction (`BEGIN IMMEDIATE`, as settings.py asks for) first takes an exclusive
`flock` on a file beside the database, and holds it until it commits or rolls back. A writer
that finds it taken tries again every millisecond, for as long as the database's `timeout`
(OPTIONS; SQLite's own wait), and then fails as SQLite would: "database is locked". Reads take
no such lock (WAL lets them run beside a write), nor does a single statement outside a
transaction, which still waits in SQLite's busy handler. A process that dies holding the lock
loses it with its descriptors.
"""

import fcntl
import os
import stat
import time

from django.core.exceptions import ImproperlyConfigured
from django.db.backends.sqlite3 import base
from django.db.utils import OperationalError

RETRY = 0.001  # seconds between tries for a taken lock


class DatabaseWrapper(base.DatabaseWrapper):
    _queue: int | None = None  # the lock file's descriptor, opened with the connection
    _queue_pid = 0  # the process that opened it: a flock belongs to the open file, which a fork shares
    _writing = False  # whether this connection holds the lock (within a transaction)

    def queue_path(self) -> str:
        return f"{self.settings_dict['NAME']}-writers"

    def get_new_connection(self, conn_params):
        connection = super().get_new_connection(conn_params)
        self._close_queue()
        if not self.is_in_memory_db():  # one connection's own database needs no queue
            self._open_queue()
        return connection

    def _open_queue(self) -> None:
        if self._queue is not None:  # inherited from the parent: closing it leaves the parent's lock be
            os.close(self._queue)
            self._queue = None
        path = self.queue_path()
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        found = os.fstat(descriptor)
        if found.st_uid != os.geteuid() or not stat.S_ISREG(found.st_mode):
            os.close(descriptor)  # whoever can hold it can stop every write
            raise ImproperlyConfigured(f"{path} is not a file of this user's: remove it, or move the database.")
        os.fchmod(descriptor, 0o600)
        self._queue, self._queue_pid, self._writing = descriptor, os.getpid(), False

    def _start_transaction_under_autocommit(self):
        if self._queue is not None:
            if self._queue_pid != os.getpid():
                self._open_queue()
            self._join_queue()
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._leave_queue()
            raise

    def _join_queue(self) -> None:
        assert self._queue is not None
        deadline = time.monotonic() + float(self.settings_dict["OPTIONS"].get("timeout", 5))
        while True:
            try:
                fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OperationalError("database is locked: another write transaction held it too long") from None
                time.sleep(RETRY)
        self._writing = True

    def _commit(self):
        try:
            return super()._commit()
        finally:
            self._leave_queue()

    def _rollback(self):
        try:
            return super()._rollback()
        finally:
            self._leave_queue()

    def _close(self):
        try:
            return super()._close()
        finally:
            self._close_queue()

    def _leave_queue(self) -> None:
        if self._writing and self._queue is not None and self._queue_pid == os.getpid():
            self._writing = False
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def _close_queue(self) -> None:
        self._leave_queue()
        if self._queue is not None:
            os.close(self._queue)
            self._queue = None
