from django.contrib import admin

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
    list_filter = ["kind", "status", "backend"]
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
        "created_at",
        "updated_at",
    ]
    exclude = ["password", "admin_password"]
    inlines = [InstanceEventInline]

    def has_add_permission(self, request):
        return False  # instances are created through the API so that a worker starts them
