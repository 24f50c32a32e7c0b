"""A worker holds an instance while it acts on it, so that two workers never act on one at once.

A claim is one conditional UPDATE of `claimed_until`; a thread renews it while the worker lives,
so only a dead worker's claim lapses and its work can be recovered.
"""

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connections
from django.db.models import Q
from django.utils import timezone

from ..backends.base import get_backend
from ..models import Instance, Status

logger = logging.getLogger(__name__)


class Busy(Exception):
    """Another worker holds the instance; the task is tried again a little later."""


def work_on(instance_id: int, statuses: tuple[Status, ...], work: Callable[..., None], *args: Any) -> None:
    """The worker side of every service: if the instance is still in one of `statuses` (a task
    may be delivered twice), claim it, call work(instance, backend, *args) and release it.

    Raises Busy if another worker holds it.
    """
    instance = Instance.objects.filter(pk=instance_id, status__in=statuses).first()
    if instance is None:
        return
    backend = get_backend(instance.backend)
    keeper = claim(instance, seconds=settings.STOCKROOM_CLAIM_SECONDS)
    if keeper is None:
        raise Busy(f"Instance {instance.pk} is held by another worker.")
    try:
        work(instance, backend, *args)
    finally:
        release(instance, keeper)


def claim(instance: Instance, *, seconds: float) -> "ClaimKeeper | None":
    """Take the instance unless another worker holds it (one UPDATE decides) and keep it until
    release(): a thread renews the claim every seconds/3, so only a dead worker's claim expires,
    `seconds` after its last renewal."""
    now = timezone.now()
    until = now + timedelta(seconds=seconds)
    taken = (
        Instance.objects.filter(pk=instance.pk)
        .filter(Q(claimed_until__isnull=True) | Q(claimed_until__lt=now))
        .update(claimed_until=until)
    )
    if not taken:
        return None
    keeper = ClaimKeeper(instance.pk, until, seconds)
    keeper.start()
    return keeper


def release(instance: Instance, keeper: "ClaimKeeper") -> None:
    """Give up the claim; a claim that expired and was taken by another worker stays."""
    Instance.objects.filter(pk=instance.pk, claimed_until__in=keeper.stop()).update(claimed_until=None)


class ClaimKeeper(threading.Thread):
    """Renews one instance's claim while the worker that holds it is busy with it.

    It stops renewing after STOCKROOM_TASK_TIME_LIMIT, the most any task may take (Celery kills a
    task that runs longer), so a hung worker's claim lapses too. No lock is held during database
    I/O; release() clears whichever end the claim has: the current one or a renewal in flight.
    """

    def __init__(self, pk: int, until: datetime, seconds: float):
        super().__init__(name=f"claim-{pk}", daemon=True)
        self.pk, self.seconds = pk, seconds
        self.ends = [until]  # the claim's end, and a renewal's while it is being written
        self.give_up_at = time.monotonic() + settings.STOCKROOM_TASK_TIME_LIMIT
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.seconds / 3) and time.monotonic() < self.give_up_at:
                until = timezone.now() + timedelta(seconds=self.seconds)
                with self.lock:
                    current = self.ends[0]
                    self.ends.append(until)
                renewed: int | None
                try:
                    renewed = Instance.objects.filter(pk=self.pk, claimed_until=current).update(claimed_until=until)
                except DatabaseError:  # a blip: keep the old end and try again next time
                    logger.warning("Could not renew the claim on instance %s", self.pk, exc_info=True)
                    close_old_connections()
                    renewed = None
                with self.lock:
                    self.ends = [until] if renewed else [current]
                if renewed == 0 and not self.stopped.is_set():
                    logger.error("Instance %s: the claim lapsed and was taken over", self.pk)
                    return
        finally:
            connections.close_all()  # this thread's own connection

    def stop(self) -> list[datetime]:
        """Stop renewing; returns the ends the claim may have now."""
        with self.lock:
            self.stopped.set()
            return list(self.ends)
