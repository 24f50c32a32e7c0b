"""API tokens stored hashed (provisioning.AccessToken, django-rest-knox's model), the tokens of DRF's
authtoken app moved into it, and the cache table that the token endpoints' throttles count in."""

import hashlib

import django.db.models.deletion
from django.conf import settings
from django.core.management import call_command
from django.db import migrations, models
from django.utils import timezone

OLD_TABLE = "authtoken_token"  # DRF's plaintext tokens; the app is no longer installed
MOVED_NAME = "token from before hashing"


def hash_old_tokens(apps, schema_editor):
    """Each plaintext DRF token becomes a hashed token that accepts the same secret, expiring after
    the default lifetime (STOCKROOM_TOKEN_TTL) from now; then the plaintext rows are deleted.

    A DRF key is 40 hex characters; knox looks a token up by its first 15 and checks the SHA-512 of
    the whole, so the same secret keeps working and nothing readable of it stays behind.
    """
    connection = schema_editor.connection
    if OLD_TABLE not in connection.introspection.table_names():
        return  # a new portal: DRF's app never made its table
    AccessToken = apps.get_model("provisioning", "AccessToken")
    table, key = connection.ops.quote_name(OLD_TABLE), connection.ops.quote_name("key")
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {key}, user_id FROM {table}")  # quoted names, no input
        rows = cursor.fetchall()
        expiry = timezone.now() + settings.STOCKROOM_TOKEN_TTL
        AccessToken.objects.using(connection.alias).bulk_create(
            AccessToken(
                user_id=user_id,
                name=MOVED_NAME,
                token_key=secret[:15],
                digest=hashlib.sha512(secret.encode()).hexdigest(),
                expiry=expiry,
            )
            for secret, user_id in rows
        )
        cursor.execute(f"DELETE FROM {table}")


def create_cache_tables(apps, schema_editor):
    """The "shared" cache's table (settings.CACHES), so that `migrate` alone readies a portal."""
    call_command("createcachetable", database=schema_editor.connection.alias, verbosity=0)


class Migration(migrations.Migration):
    dependencies = [
        ("provisioning", "0006_reservation_within_limit"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="AccessToken",
            fields=[
                ("token_key", models.CharField(db_index=True, max_length=25)),
                ("created", models.DateTimeField(auto_now_add=True)),
                ("expiry", models.DateTimeField(blank=True, null=True)),
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("digest", models.CharField(max_length=128, unique=True)),
                ("name", models.CharField(max_length=100)),
                (
                    "last_used",
                    models.DateTimeField(blank=True, help_text="Written at most once a minute.", null=True),
                ),
                (
                    "user",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="auth_token_set",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
            ],
            options={"ordering": ["-created", "-id"]},
        ),
        migrations.RunPython(hash_old_tokens, migrations.RunPython.noop),
        migrations.RunPython(create_cache_tables, migrations.RunPython.noop),
    ]
