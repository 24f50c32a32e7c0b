"""Every delivery has its own webhook-id (numbered in 0007); from now on the database says so."""

import uuid

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("provisioning", "0008_standard_webhooks")]

    operations = [
        migrations.AlterField(
            model_name="webhookdelivery",
            name="message_id",
            field=models.UUIDField(default=uuid.uuid4, editable=False, unique=True),
        ),
    ]
