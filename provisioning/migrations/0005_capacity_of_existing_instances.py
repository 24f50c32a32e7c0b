"""Reservations, limits and `holds_data` for instances made before they existed.

The engines' formulas as they were when this migration was written, so that it does the same
whatever the engines say later; instances of other kinds reserve nothing.
"""

from django.db import migrations

MiB = 1024 * 1024
BATCH = 500


def memory(kind, options):
    """(reservation, limit) in bytes."""
    if kind == "mysql":
        return 64 * MiB, 512 * MiB
    if kind == "redis":
        maxmemory = options.get("maxmemory", 64 * MiB)
        return maxmemory + 16 * MiB, maxmemory + maxmemory // 2 + 64 * MiB
    return 0, 0


def holds_data(instance, Event):
    """A failed instance kept its data if the healer gave up on it, its delete failed, or the
    clean-up of its failed create failed; a failed create's data was removed."""
    last = Event.objects.filter(instance_id=instance.pk, to_status="failed").order_by("-created_at", "-id").first()
    if last is None:
        return False
    return last.from_status in ("unhealthy", "deleting") or "Cleaning up also failed" in last.reason


def forwards(apps, schema_editor):
    Instance = apps.get_model("provisioning", "Instance")
    Event = apps.get_model("provisioning", "InstanceEvent")
    Instance.objects.filter(status="deleted").update(holds_data=False)
    for instance in Instance.objects.filter(status="failed").only("id"):
        if not holds_data(instance, Event):
            Instance.objects.filter(pk=instance.pk).update(holds_data=False)
    changed = []
    for instance in Instance.objects.exclude(status="deleted").only("id", "kind", "options").iterator():
        instance.memory_reservation, instance.memory_limit = memory(instance.kind, instance.options or {})
        changed.append(instance)
    Instance.objects.bulk_update(changed, ["memory_reservation", "memory_limit"], batch_size=BATCH)


class Migration(migrations.Migration):
    dependencies = [
        ("provisioning", "0004_capacity_fields"),
    ]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
