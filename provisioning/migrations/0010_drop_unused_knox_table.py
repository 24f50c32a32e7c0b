"""knox's own migrations make a table for its AuthToken model, which the portal swaps for
provisioning.AccessToken (KNOX_TOKEN_MODEL): nothing ever writes it. On PostgreSQL its foreign key
to auth_user also made every flush of the users (a transactional test's clean-up) fail: TRUNCATE
refuses a table that an unlisted table references. It is dropped; knox's migrations (pinned, all
applied before this one) never touch it again."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("knox", "0009_extend_authtoken_field"),
        ("provisioning", "0009_delivery_message_id_unique"),
    ]

    operations = [migrations.RunSQL("DROP TABLE IF EXISTS knox_authtoken", reverse_sql=migrations.RunSQL.noop)]
