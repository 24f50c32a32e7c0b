"""Handing work to the Celery workers. Tasks are named, not imported: the tasks call services, so
services importing the tasks module would close a circle."""

import logging
import time
from typing import Any

from celery import current_app
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)


def send(name: str, *args: Any, countdown: float | None = None) -> None:
    """Queue provisioning.tasks.<name>(*args); raises what the broker client raises when it is down.

    Kombu retries a publish while the broker is unreachable (CELERY_TASK_PUBLISH_RETRY_POLICY), but
    a connection that breaks in the middle of one (the broker was killed) can fail with another
    error, such as AttributeError: that is tried once more, on a fresh connection. A task sent twice
    is harmless: every task checks the instance's status and claims it first.
    """
    task = current_app.tasks[f"provisioning.tasks.{name}"]
    try:
        task.apply_async(args, countdown=countdown)
    except OperationalError:  # the retries are spent: the broker is down
        raise
    except Exception as exc:  # whatever a half-broken connection raises
        if current_app.conf.task_always_eager:  # tests: the task ran here, and what it raised is its own
            raise
        logger.warning("Queueing %s failed (%r); trying once more", name, exc)
        time.sleep(0.5)
        task.apply_async(args, countdown=countdown)


def send_deliveries(delivery_ids: list[int]) -> None:
    """Hand webhook deliveries to the worker. If the broker is down they stay pending, and the
    reconciler's sweep sends them later: a status change must never fail for a webhook."""
    try:
        for pk in delivery_ids:
            send("deliver_webhook", pk)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.warning("Could not queue webhook deliveries %s (%s); they are sent later", delivery_ids, exc)
