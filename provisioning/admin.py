from django.contrib import admin, messages

from . import services
from .models import Instance, InstanceEvent, Orphan, Webhook, WebhookDelivery
from .options import describe_size


class InstanceEventInline(admin.TabularInline):
    model = InstanceEvent
    fields = readonly_fields = ("created_at", "from_status", "to_status", "reason")
    extra = 0
    can_delete = False


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = [
        "id", "kind", "name", "owner", "status", "host", "port", "backend",
        "reservation", "limit", "holds_data", "created_at",
    ]  # fmt: skip
    list_filter = ["kind", "status", "backend", "holds_data", "owner"]
    actions = ["restart_instances", "stop_instances", "start_instances", "delete_instances"]
    search_fields = ["name", "owner__username", "port"]
    exclude = ["password", "admin_password"]
    inlines = [InstanceEventInline]

    @admin.display(description="memory reserved", ordering="memory_reservation")
    def reservation(self, instance: Instance) -> str:
        return describe_size(instance.memory_reservation)

    @admin.display(description="memory limit", ordering="memory_limit")
    def limit(self, instance: Instance) -> str:
        return describe_size(instance.memory_limit)

    def get_readonly_fields(self, request, obj=None):
        # Every change goes through the services (the actions above), so nothing is edited here.
        return [field.name for field in Instance._meta.fields if field.name not in self.exclude]

    @admin.action(description="Delete the selected instances (stop servers, remove data)")
    def delete_instances(self, request, queryset):
        self._apply(
            request, queryset, "delete", lambda instance: services.delete_instance(instance=instance, by=request.user)
        )

    @admin.action(description="Restart the selected instances")
    def restart_instances(self, request, queryset):
        self._request(request, queryset, "restart")

    @admin.action(description="Stop the selected instances (data kept)")
    def stop_instances(self, request, queryset):
        self._request(request, queryset, "stop")

    @admin.action(description="Start the selected stopped instances")
    def start_instances(self, request, queryset):
        self._request(request, queryset, "start")

    def _request(self, request, queryset, action: str) -> None:
        self._apply(
            request, queryset, action,
            lambda instance: services.request_action(instance=instance, action=action, by=request.user),
        )  # fmt: skip

    def _apply(self, request, queryset, verb: str, service) -> None:
        """Call the service per instance; report how many it took and why the others were refused."""
        done, refused = 0, []
        for instance in queryset.visible():
            try:
                service(instance)
                done += 1
            except (services.WrongStatus, services.QuotaExceeded, services.NoCapacity) as exc:
                refused.append(f"{instance.name}: {exc}")
        self.message_user(request, f"Asked the worker to {verb} {done} instance(s).")
        if refused:
            self.message_user(request, " ".join(refused), level=messages.WARNING)

    def has_delete_permission(self, request, obj=None):
        return False  # rows go through the service (the action above), never a raw delete

    def has_add_permission(self, request):
        return False  # instances are created through the API so that a worker starts them


@admin.register(Orphan)
class OrphanAdmin(admin.ModelAdmin):
    """What a backend runs or keeps for no instance; the reconciler removes it after the grace period."""

    list_display = readonly_fields = ("key", "backend", "description", "first_seen", "removed_at")
    list_filter = ["backend", ("removed_at", admin.EmptyFieldListFilter)]
    search_fields = ["key", "description"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class WebhookDeliveryInline(admin.TabularInline):
    model = WebhookDelivery
    fields = readonly_fields = ("created_at", "event", "message_id", "status", "attempts", "response_code", "error")
    extra = 0
    can_delete = False
    ordering = ["-created_at"]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    list_display = ["id", "url", "owner", "created_at", "legacy_signature"]
    list_filter = ["legacy_signature"]
    search_fields = ["url", "owner__username"]
    readonly_fields = ["owner", "url", "created_at"]
    exclude = ["secret"]
    inlines = [WebhookDeliveryInline]

    def has_add_permission(self, request):
        return False  # registered by their owners, who are shown the secret once
