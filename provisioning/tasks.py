from celery import shared_task

from . import services
from .services.webhooks import Sender

# A task that finds its instance held by another worker waits and tries again (1, 2, 4 … 30 s,
# about 4 minutes in all); after that the reconciler's recovery of stuck instances takes over.
WHEN_BUSY = {
    "autoretry_for": (services.Busy,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "max_retries": 12,
    "retry_jitter": False,
}


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def provision_instance(instance_id: int) -> None:
    services.provision(instance_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def deprovision_instance(instance_id: int) -> None:
    services.deprovision(instance_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def perform_action(instance_id: int, action: str) -> None:
    services.perform_action(instance_id, action)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def take_snapshot(snapshot_id: int) -> None:
    services.take_snapshot(snapshot_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def restore_instance(instance_id: int) -> None:
    services.restore_instance(instance_id)


@shared_task(acks_late=True, ignore_result=True)
def verify_snapshot(snapshot_id: int) -> None:
    services.verify_snapshot(snapshot_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def import_instance(instance_id: int) -> None:
    services.import_instance(instance_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def archive_logs(instance_id: int) -> None:
    services.archive_logs(instance_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def move_instance(instance_id: int) -> None:
    services.move_instance(instance_id)


@shared_task(acks_late=True, ignore_result=True, **WHEN_BUSY)
def evacuate_instance(instance_id: int) -> None:
    services.evacuate_instance(instance_id)


@shared_task(acks_late=True, ignore_result=True)
def heal_instance(instance_id: int) -> None:
    services.heal(instance_id)


@shared_task(acks_late=True, ignore_result=True)
def recover_instance(instance_id: int) -> None:
    services.recover(instance_id)


@shared_task(ignore_result=True)
def fill_pool() -> None:
    services.fill_pool()


@shared_task(ignore_result=True)
def reconcile() -> None:
    from .reconciler import Reconciler

    Reconciler().run_once()


@shared_task(acks_late=True, ignore_result=True)
def deliver_webhook(delivery_id: int) -> None:
    Sender().deliver(delivery_id)
