from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("provisioning", "0005_capacity_of_existing_instances"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="instance",
            constraint=models.CheckConstraint(
                condition=models.Q(("memory_reservation__lte", models.F("memory_limit"))),
                name="reservation_within_limit",
            ),
        ),
    ]
