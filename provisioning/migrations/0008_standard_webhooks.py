"""Standard Webhooks signatures: a whsec_ secret per webhook and a stable webhook-id per delivery.

A secret registered before was `whsec_` + URL-safe text, and its UTF-8 bytes were the HMAC key of
the X-Stockroom-Signature header. Those bytes stay the key: the secret is stored again as `whsec_`
+ base64 of them (what the Standard Webhooks libraries decode), and such webhooks keep sending the
old header too, so a receiver keeps working until it switches to the new headers. Receivers
convert what they were shown with `"whsec_" + base64(old secret)` (README, "Webhooks").
"""

import base64
import uuid

from django.db import migrations, models

import provisioning.fields


def wrap_secrets(apps, schema_editor):
    Webhook = apps.get_model("provisioning", "Webhook")
    for webhook in Webhook.objects.only("id", "secret").iterator():
        wrapped = "whsec_" + base64.b64encode(webhook.secret.encode()).decode()
        Webhook.objects.filter(pk=webhook.pk).update(secret=wrapped, legacy_signature=True)


def unwrap_secrets(apps, schema_editor):
    Webhook = apps.get_model("provisioning", "Webhook")
    for webhook in Webhook.objects.filter(legacy_signature=True).only("id", "secret").iterator():
        original = base64.b64decode(webhook.secret.removeprefix("whsec_")).decode()
        Webhook.objects.filter(pk=webhook.pk).update(secret=original)


def number_deliveries(apps, schema_editor):
    Delivery = apps.get_model("provisioning", "WebhookDelivery")
    for pk in Delivery.objects.filter(message_id__isnull=True).values_list("pk", flat=True).iterator():
        Delivery.objects.filter(pk=pk).update(message_id=uuid.uuid4())


class Migration(migrations.Migration):
    dependencies = [("provisioning", "0007_access_tokens")]

    operations = [
        migrations.AlterField(
            model_name="webhook",
            name="secret",
            field=provisioning.fields.EncryptedTextField(
                help_text="Signs each delivery (whsec_ + base64 of the key); shown to the owner once."
            ),
        ),
        migrations.AlterField(
            model_name="webhookdelivery",
            name="attempts",
            field=models.PositiveIntegerField(default=0, help_text="Counted when an attempt starts."),
        ),
        migrations.AddField(
            model_name="webhook",
            name="legacy_signature",
            field=models.BooleanField(
                default=False,
                help_text="Also send the old X-Stockroom-Signature header (for webhooks registered before v2).",
            ),
        ),
        migrations.RunPython(wrap_secrets, unwrap_secrets),
        migrations.AddField(
            model_name="webhookdelivery",
            name="message_id",
            field=models.UUIDField(editable=False, null=True),
        ),
        migrations.RunPython(number_deliveries, migrations.RunPython.noop),
        # Made unique in 0008, after the rows are numbered (Django's way for a unique field added).
    ]
