from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from provisioning.backends.base import BackendError, get_backend
from provisioning.models import Instance


class Command(BaseCommand):
    help = "List (and with --remove, remove) what a backend keeps for the portal that belongs to no instance."

    def add_arguments(self, parser):
        parser.add_argument("--backend", default=None, help="Alias in STOCKROOM_BACKENDS (default: every backend).")
        parser.add_argument("--remove", action="store_true", help="Remove the orphans, data included.")

    def handle(self, *args, backend: str | None, remove: bool, **options):
        aliases = [backend] if backend else list(settings.STOCKROOM_BACKENDS)
        total = 0
        for alias in aliases:
            known = set(Instance.objects.visible().filter(backend=alias).values_list("pk", flat=True))
            try:
                found = get_backend(alias).orphans(known)
                for key, description in found.items():
                    self.stdout.write(f"{alias}\t{key}\t{description}")
                    if remove:
                        get_backend(alias).remove_orphan(key)
            except BackendError as exc:
                if backend:
                    raise CommandError(str(exc)) from exc
                self.stderr.write(f"{alias}: {exc}")
                continue
            total += len(found)
        self.stdout.write(f"{'Removed' if remove else 'Found'} {total} orphan(s).")
