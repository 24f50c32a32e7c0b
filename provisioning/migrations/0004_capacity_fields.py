from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("provisioning", "0003_kinds_from_the_engine_registry"),
    ]

    operations = [
        migrations.CreateModel(
            name="Lock",
            fields=[
                ("name", models.CharField(max_length=32, primary_key=True, serialize=False)),
            ],
        ),
        migrations.AddField(
            model_name="instance",
            name="holds_data",
            field=models.BooleanField(
                default=True, help_text="Its data may still exist on the backend; it counts against the owner's quota."
            ),
        ),
        migrations.AddField(
            model_name="instance",
            name="memory_limit",
            field=models.PositiveBigIntegerField(
                default=0, help_text="Bytes the server may use at most (the kernel's limit)."
            ),
        ),
        migrations.AddField(
            model_name="instance",
            name="memory_reservation",
            field=models.PositiveBigIntegerField(
                default=0,
                help_text="Bytes the server is expected to use; counted against the memory budget and quota.",
            ),
        ),
    ]
