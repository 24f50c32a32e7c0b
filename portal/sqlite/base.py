"""Django's SQLite backend, with write transactions that queue instead of sleeping.

SQLite lets one transaction write at a time. One that finds the lock taken sleeps and tries
again, each sleep longer than the last (SQLite's busy handler: 1, 2, 5, 10, 15, 20, 25 … up to
100 ms), so a transaction may sleep 25 ms for a lock freed after 2. Under eight creates at once
most of each create's time went on such sleeps.

Here a write transaction (`BEGIN IMMEDIATE`, as settings.py asks for) first takes an exclusive
`flock` on a file beside the database, and holds it until it commits or rolls back. Waiting
writers of every process and thread sleep in the kernel, which wakes one of them as soon as the
lock is free. Reads take no such lock (WAL lets them run beside a write), nor does a single
statement outside a transaction, which still waits in SQLite's busy handler. A process that dies
holding the lock loses it with its descriptors. The wait has no timeout of its own: it lasts as
long as the transactions ahead of it, which SQLite's lock made every writer wait for as well.
"""

import fcntl
import os

from django.db.backends.sqlite3 import base


class DatabaseWrapper(base.DatabaseWrapper):
    _queue: int | None = None  # the lock file's descriptor, opened with the connection
    _queue_pid = 0  # the process that opened it: a forked child must not share its lock
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
        self._queue = os.open(self.queue_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._queue_pid, self._writing = os.getpid(), False

    def _start_transaction_under_autocommit(self):
        if self._queue is not None:
            if self._queue_pid != os.getpid():  # a flock belongs to the open file, which a fork shares
                self._open_queue()
            fcntl.flock(self._queue, fcntl.LOCK_EX)
            self._writing = True
        try:
            super()._start_transaction_under_autocommit()
        except BaseException:
            self._leave_queue()
            raise

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
        if self._writing and self._queue is not None:
            self._writing = False
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    def _close_queue(self) -> None:
        if self._queue_pid == os.getpid():  # not a lock a parent holds on the open file it shares
            self._leave_queue()
        if self._queue is not None:
            os.close(self._queue)
            self._queue = None
