from django.contrib import admin, messages

from . import services
from .models import Instance, InstanceEvent


class InstanceEventInline(admin.TabularInline):
    model = InstanceEvent
    fields = ["created_at", "from_status", "to_status", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = ["id", "kind", "name", "owner", "status", "host", "port", "backend", "created_at"]
    list_filter = ["kind", "status", "backend", "owner"]
    actions = ["delete_instances"]
    search_fields = ["name", "owner__username", "port"]
    readonly_fields = [
        "owner",
        "kind",
        "status",
        "status_message",
        "backend",
        "host",
        "port",
        "database",
        "username",
        "options",
        "timings",
        "created_at",
        "updated_at",
    ]
    exclude = ["password", "admin_password"]
    inlines = [InstanceEventInline]

    @admin.action(description="Delete the selected instances (stop servers, remove data)")
    def delete_instances(self, request, queryset):
        deleted, refused = 0, []
        for instance in queryset.visible():
            try:
                services.delete_instance(instance=instance, by=request.user)
                deleted += 1
            except services.WrongStatus as exc:
                refused.append(f"{instance.name}: {exc}")
        self.message_user(request, f"Deleting {deleted} instance(s).")
        if refused:
            self.message_user(request, " ".join(refused), level=messages.WARNING)

    def has_delete_permission(self, request, obj=None):
        return False  # rows go through the service (the action above), never a raw delete

    def has_add_permission(self, request):
        return False  # instances are created through the API so that a worker starts them
