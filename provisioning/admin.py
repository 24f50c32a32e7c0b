from axes import admin as axes_admin
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.options import ActionLocation
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q, Sum
from django.http import FileResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from . import services, views
from .engines import engines
from .models import (
    AccessToken,
    CertificateAuthority,
    Instance,
    InstanceEvent,
    LogFile,
    Orphan,
    Snapshot,
    Status,
    Webhook,
    WebhookDelivery,
)
from .options import describe_size
from .services import fleet, tokens


class InstanceEventInline(admin.TabularInline):
    model = InstanceEvent
    fields = readonly_fields = ("created_at", "from_status", "to_status", "reason")
    extra = 0
    can_delete = False


class KnownValuesFilter(admin.ChoicesFieldListFilter):
    """A filter on a field without choices whose values the portal knows without asking the
    database: Django's own (AllValuesFieldListFilter) reads SELECT DISTINCT over the whole table on
    every page of the list. The same `<field>__exact` parameter."""

    @staticmethod
    def known() -> list[tuple[str, str]]:
        raise NotImplementedError

    def get_facet_counts(self, pk_attname, filtered_qs):
        return {
            f"{i}__c": Count(pk_attname, filter=Q((self.lookup_kwarg, value)))
            for i, (value, _) in enumerate(self.known())
        }

    def choices(self, changelist):
        facet_counts = self.get_facet_queryset(changelist) if changelist.add_facets else None
        yield {
            "selected": self.lookup_val is None,
            "query_string": changelist.get_query_string(remove=[self.lookup_kwarg, self.lookup_kwarg_isnull]),
            "display": "All",
        }
        for i, (value, title) in enumerate(self.known()):
            yield {
                "selected": self.lookup_val is not None and value in self.lookup_val,
                "query_string": changelist.get_query_string({self.lookup_kwarg: value}, [self.lookup_kwarg_isnull]),
                "display": f"{title} ({facet_counts[f'{i}__c']})" if facet_counts else title,
            }


class KindFilter(KnownValuesFilter):
    """The registered engines."""

    @staticmethod
    def known() -> list[tuple[str, str]]:
        return [(kind, engine.label) for kind, engine in engines().items()]


class BackendFilter(KnownValuesFilter):
    """The configured backends."""

    @staticmethod
    def known() -> list[tuple[str, str]]:
        return [(alias, alias) for alias in settings.STOCKROOM_BACKENDS]


class UpgradeFilter(admin.SimpleListFilter):
    """Instances whose server runs another version than a restart would start."""

    title = "restart to upgrade"
    parameter_name = "upgrade"

    def lookups(self, request, model_admin):
        return [("yes", "Restart to upgrade"), ("no", "Up to date")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return services.needing_upgrade(queryset, flagged=self.value() == "yes")
        return queryset


# Instance actions that take servers to another host: offered only with a backend that has others.
FLEET_ACTIONS = ("move_instances", "evacuate_instances")


@admin.register(Instance)
class InstanceAdmin(admin.ModelAdmin):
    list_display = [
        "id", "kind", "name", "owner_link", "status", "address", "backend",
        "memory", "version", "holds_data", "expires_at", "protected", "pool", "created_at",
    ]  # fmt: skip
    # A list of 100,000 rows (most of them deleted) at the same number of queries as one of ten:
    # the owners joined, not one query per row; no count of the whole table beside the filtered
    # one; and filters whose choices need no query. There is no owner filter listing every user:
    # click an owner to see theirs (?owner__id__exact=N).
    list_select_related = ["owner"]
    show_full_result_count = False
    list_per_page = 25  # each row costs about 0.85 ms to render (15 cells): 25 rows are half the page's time
    list_filter = [
        ("kind", KindFilter), "status", ("backend", BackendFilter), "pool", UpgradeFilter, "holds_data",
        "protected", ("expires_at", admin.EmptyFieldListFilter), ("stop_when_idle", admin.EmptyFieldListFilter),
    ]  # fmt: skip
    actions = [
        "restart_instances", "stop_instances", "start_instances", "delete_instances",
        "extend_instances", "protect_instances", "unprotect_instances", "move_instances",
        "evacuate_instances",
    ]  # fmt: skip
    search_fields = ["name", "owner__username", "port"]
    exclude = ["password", "admin_password", "tls_key"]  # tls_expires_at: when its certificate expires
    inlines = [InstanceEventInline]

    def action_checkbox(self, instance: Instance) -> SafeString:
        """Django's checkbox, written directly: its form widget renders a template for each row,
        a tenth of a 50-row page's time."""
        return format_html(
            '<input type="checkbox" name="{}" value="{}" class="action-select" aria-label="{}">',
            helpers.ACTION_CHECKBOX_NAME,
            instance.pk,
            f"Select this object for an action - {instance}",
        )

    @admin.display(description="owner", ordering="owner__username")
    def owner_link(self, instance: Instance) -> str:
        url = reverse("admin:provisioning_instance_changelist")
        return format_html('<a href="{}?owner__id__exact={}">{}</a>', url, instance.owner_id, instance.owner)

    @admin.display(description="address", ordering="port")
    def address(self, instance: Instance) -> str:
        return f"{instance.host}:{instance.port}" if instance.port else "-"

    @admin.display(description="memory reserved (limit)", ordering="memory_reservation")
    def memory(self, instance: Instance) -> str:
        return f"{describe_size(instance.memory_reservation)} ({describe_size(instance.memory_limit)})"

    @admin.display(description="server version", ordering="server_version")
    def version(self, instance: Instance) -> str:
        if services.upgrade_available(instance):
            return f"{instance.server_version} (restart to upgrade)"
        return instance.server_version

    @admin.display(description="recovery window (UTC)")
    def recovery_window(self, instance: Instance) -> str:
        window = services.recovery_window(instance)
        if window is None:
            return "none yet: it begins with the first snapshot of its timeline"
        return f"{window[0]:%Y-%m-%d %H:%M:%S} to {window[1]:%Y-%m-%d %H:%M:%S}"

    @admin.display(description="settings")
    def settings_link(self, instance: Instance) -> str:
        url = reverse("admin:provisioning_instance_settings", args=[instance.pk])
        return format_html('<a href="{}">Change options…</a> (live, on restart or set at create)', url)

    def get_queryset(self, request):
        # The pages show no secret: none is decrypted for a row until something reads it.
        return super().get_queryset(request).without_secrets()

    def changelist_view(self, request, extra_context=None):
        """The warm pool's state above the list: pool servers are the rows owned by the pool's user."""
        summary = services.pool.summary()
        if any(counts["wanted"] or counts["ready"] or counts["starting"] for counts in summary.values()):
            said = "; ".join(
                f"{kind} {counts['ready']} ready, {counts['starting']} starting, {counts['wanted']} wanted"
                for kind, counts in summary.items()
            )
            messages.info(request, f"Warm pool (filter by “pool”, owner {services.pool.USERNAME}): {said}.")
        if fleet.placing_backends():  # a link to the nodes, when there are hosts to list
            extra_context = {**(extra_context or {}), "nodes_url": reverse("admin:provisioning_instance_nodes")}
        return super().changelist_view(request, extra_context)

    def get_urls(self):
        settings = path(
            "<int:pk>/settings/",
            self.admin_site.admin_view(self.settings_view),
            name="provisioning_instance_settings",
        )
        nodes = path("nodes/", self.admin_site.admin_view(self.nodes_view), name="provisioning_instance_nodes")
        return [settings, nodes, *super().get_urls()]

    def nodes_view(self, request):
        """The nodes of the backends that place servers on many hosts (services/fleet.py): staff who
        may view instances see them; those who may change instances activate, pause or drain one."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        may_change = self.has_change_permission(request)
        if request.method == "POST":
            if not may_change:
                raise PermissionDenied
            action, alias, node_id = (request.POST.get(name, "") for name in ("action", "backend", "node"))
            if action not in fleet.ACTIONS:
                return HttpResponseBadRequest(
                    f"The action is {' or '.join(fleet.ACTIONS)}, not {action!r}.", content_type="text/plain"
                )
            try:
                _row, said = fleet.act(alias, node_id, action, by=request.user)
            except (fleet.UnknownNode, fleet.FleetUnavailable) as exc:
                self.message_user(request, f"Could not {action} node {node_id}: {exc}", level=messages.ERROR)
            else:
                self.message_user(request, said)
            return redirect("admin:provisioning_instance_nodes")
        rows = fleet.nodes()
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Nodes",
            "rows": [row for row in rows if not row.error],
            "errors": [row for row in rows if row.error],
            "may_change": may_change,
            "actions": list(fleet.ACTIONS.items()),
        }
        return render(request, "admin/provisioning/instance/nodes.html", context)

    def settings_view(self, request, pk: int):
        """The owner's settings form, for operators who may change instances: the same service."""
        if not self.has_change_permission(request):
            raise PermissionDenied
        instance = get_object_or_404(Instance.objects.visible(), pk=pk)
        form, changed = views.settings_form(request, instance)
        if changed is not None:
            pending = (
                f" Waiting for a restart: {', '.join(changed.pending_options)}." if changed.pending_options else ""
            )
            self.message_user(request, f"Saved; live changes are applied.{pending}")
            return redirect("admin:provisioning_instance_change", pk)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": instance,
            "form": form,
            "title": f"Options of {instance.name}",
        }
        return render(request, "admin/provisioning/instance/settings.html", context)

    def get_readonly_fields(self, request, obj=None):
        # Every change goes through the services (the actions above and the settings form).
        fields = [field.name for field in Instance._meta.fields if field.name not in self.exclude]
        return [*fields, "settings_link", "recovery_window", "version"]

    # Each action asks for the model permission it stands for (Django then neither lists it nor
    # carries it out for anyone without it, whatever is POSTed): "delete" for deleting, "change" for
    # stop, start and restart. A staff user who may only view instances gets no action at all.
    @admin.action(description="Delete the selected instances (stop servers, remove data)", permissions=["remove"])
    def delete_instances(self, request, queryset):
        self._apply(
            request, queryset, "delete", lambda instance: services.delete_instance(instance=instance, by=request.user)
        )

    @admin.action(description="Restart the selected instances", permissions=["change"])
    def restart_instances(self, request, queryset):
        self._request(request, queryset, "restart")

    @admin.action(description="Stop the selected instances (data kept)", permissions=["change"])
    def stop_instances(self, request, queryset):
        self._request(request, queryset, "stop")

    @admin.action(description="Start the selected stopped instances", permissions=["change"])
    def start_instances(self, request, queryset):
        self._request(request, queryset, "start")

    @admin.action(description="Extend the expiry of the selected instances by 1 day from now", permissions=["change"])
    def extend_instances(self, request, queryset):
        self._apply(
            request, queryset, "extend",
            lambda instance: services.extend_expiry(instance=instance, data={"expires_in": "1d"}, by=request.user),
        )  # fmt: skip

    @admin.action(description="Protect the selected instances from expiry and deletion", permissions=["change"])
    def protect_instances(self, request, queryset):
        self._apply(
            request, queryset, "protect",
            lambda instance: services.set_protected(instance=instance, protected=True, by=request.user),
        )  # fmt: skip

    @admin.action(description="Stop protecting the selected instances", permissions=["change"])
    def unprotect_instances(self, request, queryset):
        self._apply(
            request, queryset, "unprotect",
            lambda instance: services.set_protected(instance=instance, protected=False, by=request.user),
        )  # fmt: skip

    @admin.action(description="Move the selected running instances to another node", permissions=["change"])
    def move_instances(self, request, queryset):
        def move(instance: Instance) -> str:
            services.request_move(instance=instance, by=request.user)
            return "moving to the node with the most room, with its data; its writes pause while it moves."

        self._one_by_one(request, queryset, Status.RUNNING, move)

    @admin.action(
        description="Evacuate the selected unreachable instances (rebuilt on another node from their last snapshot)",
        permissions=["change"],
    )
    def evacuate_instances(self, request, queryset):
        def evacuate(instance: Instance) -> str:
            snapshot = services.evacuation_source(instance)
            services.request_evacuation(instance=instance, by=request.user)
            return (
                f"being rebuilt on another node from its snapshot of {snapshot.created_at:%Y-%m-%d %H:%M:%S} UTC; "
                "writes after that are lost."
            )

        self._one_by_one(request, queryset, Status.UNREACHABLE, evacuate)

    def _one_by_one(self, request, queryset, wanted: Status, service) -> None:
        """Call `service` (it returns what it did) for each selected instance that is `wanted`; one
        message per instance: what was done, why it was refused, or that it was skipped."""
        for instance in queryset.visible().order_by("pk"):
            if instance.status != wanted:
                said, level = f"skipped: it is {instance.status}, not {wanted}.", messages.WARNING
            else:
                try:
                    said, level = service(instance), messages.SUCCESS
                except (services.WrongStatus, services.CannotMove, services.NoCapacity) as exc:
                    said, level = str(exc), messages.ERROR
            self.message_user(request, f"Instance {instance.name}: {said}", level=level)

    def get_actions(self, request, action_location=ActionLocation.CHANGE_LIST):
        actions = super().get_actions(request, action_location)
        if not fleet.placing_backends():  # every server on one host: there is nowhere to move to
            for name in FLEET_ACTIONS:
                actions.pop(name, None)
        return actions

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
        done_words = {"extend": "Extended", "protect": "Protected", "unprotect": "Stopped protecting"}
        if verb in done_words:
            self.message_user(request, f"{done_words[verb]} {done} instance(s).")
        else:
            self.message_user(request, f"Asked the worker to {verb} {done} instance(s).")
        if refused:
            self.message_user(request, " ".join(refused), level=messages.WARNING)

    def has_delete_permission(self, request, obj=None):
        return False  # rows go through the service (the action above), never a raw delete

    def has_remove_permission(self, request) -> bool:
        """May delete instances through the service: the model's delete permission."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.delete_{opts.model_name}")

    def has_add_permission(self, request):
        return False  # instances are created through the API so that a worker starts them


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    """Snapshots of instances' data, with the storage each user's take (above the list)."""

    list_display = [
        "id", "kind", "instance_name", "instance", "owner", "status", "trigger", "size", "timeline", "created_at",
        "expires_at", "verify_status", "verified_at", "download",
    ]  # fmt: skip
    list_filter = [
        "kind", "status", "trigger", "verify_status", "owner", ("expires_at", admin.EmptyFieldListFilter),
    ]  # fmt: skip
    search_fields = ["instance_name", "owner__username", "checksum"]
    actions = ["delete_snapshots", "verify_snapshots"]
    change_list_template = "admin/provisioning/snapshot/change_list.html"

    @admin.display(description="size", ordering="size_bytes")
    def size(self, snapshot: Snapshot) -> str:
        return describe_size(snapshot.size_bytes)

    @admin.display(description="export")
    def download(self, snapshot: Snapshot) -> str:
        if snapshot.status != "ready":
            return ""
        return format_html(
            '<a href="{}">Download</a>', reverse("admin:provisioning_snapshot_download", args=[snapshot.pk])
        )

    def get_urls(self):
        download = path(
            "<int:sid>/download/", self.admin_site.admin_view(self.download_view), name="provisioning_snapshot_download"
        )
        return [download, *super().get_urls()]

    def download_view(self, request, sid: int):
        """The snapshot's portable file, as its owner downloads it (staff who may view snapshots)."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        snapshot = get_object_or_404(Snapshot, pk=sid)
        try:
            made = services.export_snapshot(snapshot=snapshot)
        except (services.SnapshotBusy, services.ExportFailed) as exc:
            self.message_user(request, str(exc), level=messages.ERROR)
            return redirect("admin:provisioning_snapshot_changelist")
        return FileResponse(made.file, as_attachment=True, filename=made.filename, content_type=made.media_type)

    @admin.action(description="Verify the selected snapshots in a throwaway server", permissions=["change"])
    def verify_snapshots(self, request, queryset):
        done, refused = 0, []
        for snapshot in queryset:
            try:
                services.request_verify(snapshot=snapshot, by=request.user)
                done += 1
            except services.SnapshotBusy as exc:
                refused.append(str(exc))
        self.message_user(request, f"Verifying {done} snapshot(s); the result shows in the list.")
        if refused:
            self.message_user(request, " ".join(refused), level=messages.WARNING)

    def changelist_view(self, request, extra_context=None):
        """Above the list: each user's snapshots and archived logs, and the bytes they take together."""
        rows: dict[str, dict] = {}
        for model, counted in ((Snapshot, "snapshots"), (LogFile, "logs")):
            for row in model.objects.values("owner__username").annotate(count=Count("id"), total=Sum("size_bytes")):
                user = rows.setdefault(row["owner__username"], {"snapshots": 0, "logs": 0, "total": 0})
                user[counted] = row["count"]
                user["total"] += row["total"] or 0
        usage = [
            {"user": name, **row, "size": describe_size(row["total"])}
            for name, row in sorted(rows.items(), key=lambda item: (-item[1]["total"], item[0]))
        ]
        return super().changelist_view(request, {**(extra_context or {}), "storage_per_user": usage})

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in Snapshot._meta.fields]

    @admin.action(description="Delete the selected snapshots and their files", permissions=["delete"])
    def delete_snapshots(self, request, queryset):
        done, refused = 0, []
        for snapshot in queryset:
            try:
                services.delete_snapshot(snapshot=snapshot)
                done += 1
            except services.SnapshotBusy as exc:
                refused.append(str(exc))
        self.message_user(request, f"Deleted {done} snapshot(s).")
        if refused:
            self.message_user(request, " ".join(refused), level=messages.WARNING)

    def get_actions(self, request, action_location=ActionLocation.CHANGE_LIST):
        actions = super().get_actions(request, action_location)
        actions.pop("delete_selected", None)  # a raw delete would leave the files behind
        return actions

    def delete_model(self, request, obj):
        services.delete_snapshot(snapshot=obj)

    def has_delete_permission(self, request, obj=None):
        # Not offered while it is being made or restored (the list's action says why, per snapshot).
        return super().has_delete_permission(request, obj) and (obj is None or not services.snapshot_busy(obj))

    def has_add_permission(self, request):
        return False  # taken through the API or the instance page, so that a worker makes them


@admin.register(LogFile)
class LogFileAdmin(admin.ModelAdmin):
    """Archived log files (point-in-time recovery); the reconciler prunes them with their snapshots."""

    list_display = ["id", "kind", "instance", "timeline", "name", "owner", "size", "opened_at", "closed_at"]
    list_filter = ["kind", "owner"]
    search_fields = ["name", "owner__username"]

    @admin.display(description="size", ordering="size_bytes")
    def size(self, log: LogFile) -> str:
        return describe_size(log.size_bytes)

    def get_readonly_fields(self, request, obj=None):
        return [field.name for field in LogFile._meta.fields]

    def has_add_permission(self, request):
        return False  # archived by the worker

    def has_delete_permission(self, request, obj=None):
        return False  # pruned with their snapshots, files included


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


@admin.register(CertificateAuthority)
class CertificateAuthorityAdmin(admin.ModelAdmin):
    """The portal's CA (services/certificates.py): its certificate, never its key. Made once, when
    the first instance asks for TLS; nothing here changes it."""

    list_display = ("name", "created_at", "expires_at")
    fields = readonly_fields = ("name", "certificate", "created_at", "expires_at")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # every instance's certificate is signed with it


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


@admin.register(AccessToken)
class AccessTokenAdmin(admin.ModelAdmin):
    """Every user's API tokens: seen, and revoked, by an operator. Neither secret nor digest is shown."""

    list_display = ["id", "name", "user", "created", "expiry", "last_used"]
    list_filter = ["user"]
    search_fields = ["name", "user__username"]
    fields = ("name", "user", "created", "expiry", "last_used")
    readonly_fields = fields
    actions = ["revoke_tokens"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("user").defer("digest", "token_key")

    def get_actions(self, request, action_location=ActionLocation.CHANGE_LIST):
        actions = super().get_actions(request, action_location=action_location)
        actions.pop("delete_selected", None)  # a bulk delete, past the service; revoking is the same, logged
        return actions

    @admin.action(description="Revoke the selected tokens (they stop working at once)", permissions=["delete"])
    def revoke_tokens(self, request, queryset):
        count = 0
        for token in queryset:
            tokens.revoke_token(token=token, by=request.user)
            count += 1
        self.message_user(request, f"Revoked {count} token(s).")

    def delete_model(self, request, obj):
        tokens.revoke_token(token=obj, by=request.user)

    def has_add_permission(self, request):
        return False  # a token's secret is shown to whoever creates it: users do, on their token page

    def has_change_permission(self, request, obj=None):
        return False


# Sign-in lock-out (django-axes; AXES_ENABLE_ADMIN is off so that its models are registered here).
@admin.register(AccessAttempt)
class AccessAttemptAdmin(axes_admin.AccessAttemptAdmin):
    """Failed sign-ins, one row per user name, address and browser. A user name, or an address, is
    locked out while its rows within the cool-off add up to the limit; Unlock deletes the selected
    rows (search for the user name or the address and select all its rows to unlock it at once)."""

    actions = ["unlock", "cleanup_expired_attempts"]

    @admin.action(description="Unlock: forget the selected failed sign-ins", permissions=["delete"])
    def unlock(self, request, queryset):
        names = sorted({attempt.username or "(none)" for attempt in queryset})
        addresses = sorted({attempt.ip_address or "(none)" for attempt in queryset})
        count, _ = queryset.delete()
        self.message_user(
            request,
            f"Removed {count} record(s) of failed sign-ins: user names {', '.join(names)}; "
            f"addresses {', '.join(addresses)}.",
        )

    @admin.action(description="Clean up expired attempts", permissions=["delete"])
    def cleanup_expired_attempts(self, request, queryset):
        super().cleanup_expired_attempts(request, queryset)


admin.site.register(AccessLog, axes_admin.AccessLogAdmin)
admin.site.register(AccessFailureLog, axes_admin.AccessFailureLogAdmin)
