"""Handing work to the Celery workers. Tasks are named, not imported: the tasks call services, so
services importing the tasks module would close a circle."""

import logging
from typing import Any

from celery import current_app

logger = logging.getLogger(__name__)


def send(name: str, *args: Any, countdown: float | None = None) -> None:
    """Queue provisioning.tasks.<name>(*args); raises what the broker client raises when it is down."""
    task = current_app.tasks[f"provisioning.tasks.{name}"]
    if countdown is None:
        task.delay(*args)
    else:
        task.apply_async(args, countdown=countdown)


def send_deliveries(delivery_ids: list[int]) -> None:
    """Hand webhook deliveries to the worker. If the broker is down they stay pending, and the
    reconciler's sweep sends them later: a status change must never fail for a webhook."""
    try:
        for pk in delivery_ids:
            send("deliver_webhook", pk)
    except Exception as exc:  # noqa: BLE001 - kombu raises many kinds of connection errors
        logger.warning("Could not queue webhook deliveries %s (%s); they are sent later", delivery_ids, exc)
