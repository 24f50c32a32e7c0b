from django.apps import AppConfig


class ProvisioningConfig(AppConfig):
    name = "provisioning"
    verbose_name = "Provisioning"

    def ready(self) -> None:
        # Services queue tasks by name (services/jobs.py); the web process must know them too.
        from . import tasks  # noqa: F401
