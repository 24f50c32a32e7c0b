from django.core.management.base import BaseCommand, CommandError

from provisioning.backends.base import BackendError, get_backend
from provisioning.backends.docker import LABEL, DockerBackend
from provisioning.models import Instance


class Command(BaseCommand):
    help = "List (and with --remove, remove) this portal's containers that belong to no live instance."

    def add_arguments(self, parser):
        parser.add_argument("--backend", default="docker", help="Alias in STOCKROOM_BACKENDS (default: docker).")
        parser.add_argument("--remove", action="store_true", help="Remove the orphans and their data.")

    def handle(self, *args, backend: str, remove: bool, **options):
        docker = get_backend(backend)
        if not isinstance(docker, DockerBackend):
            raise CommandError(f"The backend {backend!r} is not a Docker backend.")
        known = set(Instance.objects.live().filter(backend=backend).values_list("pk", flat=True))
        try:
            orphans = docker.orphans(known)
            for container in orphans:
                labels = container.labels
                self.stdout.write(
                    f"{container.name}\t{labels.get(f'{LABEL}.kind')}\tinstance {labels.get(f'{LABEL}.instance')}"
                    f"\t{container.status}"
                )
                if remove:
                    docker.remove_container(container)
        except BackendError as exc:
            raise CommandError(str(exc)) from exc
        verb = "Removed" if remove else "Found"
        self.stdout.write(f"{verb} {len(orphans)} orphaned container(s).")
