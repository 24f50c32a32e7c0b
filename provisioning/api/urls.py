from django.urls import re_path

from ..services.fleet import ACTIONS
from .fleet import NodeActionView, NodesView
from .views import AccessTokenViewSet, InstanceViewSet, ObtainTokenView, SnapshotViewSet, UsageView, WebhookViewSet

# Any kind fits the pattern; InstanceViewSet answers 404 for one no engine is registered for,
# so a new engine needs no new URLs. Trailing slashes are optional on every path.
INSTANCES = r"^storage/(?P<kind>[a-z0-9]+)/instances"
SNAPSHOTS = r"^storage/(?P<kind>[a-z0-9]+)/snapshots"

urlpatterns = [
    re_path(r"^auth/token/?$", ObtainTokenView.as_view(), name="api-token"),
    re_path(
        r"^auth/tokens/?$",
        AccessTokenViewSet.as_view({"get": "list", "post": "create"}, name="Tokens"),
        name="token-list",
    ),
    re_path(
        r"^auth/tokens/(?P<pk>[0-9]+)/?$",
        AccessTokenViewSet.as_view({"delete": "destroy"}, name="Token"),
        name="token-detail",
    ),
    re_path(
        rf"{INSTANCES}/?$",
        InstanceViewSet.as_view({"get": "list", "post": "create"}, name="{label} instances"),
        name="instance-list",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/?$",
        InstanceViewSet.as_view(
            {"get": "retrieve", "patch": "partial_update", "delete": "destroy"}, name="{label} instance"
        ),
        name="instance-detail",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/config/?$",
        InstanceViewSet.as_view({"get": "config"}, name="{label} instance: connection"),
        name="instance-config",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/snapshots/?$",
        InstanceViewSet.as_view({"get": "snapshots", "post": "snapshots"}, name="{label} instance: snapshots"),
        name="instance-snapshots",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/restore/?$",
        InstanceViewSet.as_view({"post": "restore"}, name="{label} instance: restore"),
        name="instance-restore",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/evacuate/?$",
        InstanceViewSet.as_view({"post": "evacuate"}, name="{label} instance: evacuate"),
        name="instance-evacuate",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/move/?$",
        InstanceViewSet.as_view({"post": "move"}, name="{label} instance: move"),
        name="instance-move",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/import/?$",
        InstanceViewSet.as_view({"post": "import_file"}, name="{label} instance: import"),
        name="instance-import",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/extend/?$",
        InstanceViewSet.as_view({"post": "extend"}, name="{label} instance: extend"),
        name="instance-extend",
    ),
    re_path(rf"{SNAPSHOTS}/?$", SnapshotViewSet.as_view({"get": "list"}, name="Snapshots"), name="snapshot-list"),
    re_path(
        rf"{SNAPSHOTS}/(?P<pk>[0-9]+)/?$",
        SnapshotViewSet.as_view({"get": "retrieve", "delete": "destroy"}, name="Snapshot"),
        name="snapshot-detail",
    ),
    re_path(
        rf"{SNAPSHOTS}/(?P<pk>[0-9]+)/download/?$",
        SnapshotViewSet.as_view({"get": "download"}, name="Snapshot: download"),
        name="snapshot-download",
    ),
    re_path(
        rf"{SNAPSHOTS}/(?P<pk>[0-9]+)/verify/?$",
        SnapshotViewSet.as_view({"post": "verify"}, name="Snapshot: verify"),
        name="snapshot-verify",
    ),
    re_path(
        rf"{INSTANCES}/(?P<pk>[0-9]+)/events/?$",
        InstanceViewSet.as_view({"get": "events"}, name="{label} instance: history"),
        name="instance-events",
    ),
    *[
        re_path(
            rf"{INSTANCES}/(?P<pk>[0-9]+)/{action}/?$",
            InstanceViewSet.as_view(
                {"post": action.replace("-", "_")}, name=f"{{label}} instance: {action.replace('-', ' ')}"
            ),
            name=f"instance-{action}",
        )
        for action in ("stop", "start", "restart", "rotate-password")
    ],
    re_path(r"^usage/?$", UsageView.as_view(), name="usage"),
    re_path(r"^fleet/nodes/?$", NodesView.as_view(), name="fleet-nodes"),
    re_path(
        rf"^fleet/nodes/(?P<node_id>[A-Za-z0-9_.-]+)/(?P<action>{'|'.join(ACTIONS)})/?$",
        NodeActionView.as_view(),
        name="fleet-node-action",
    ),
    re_path(
        r"^webhooks/?$",
        WebhookViewSet.as_view({"get": "list", "post": "create"}, name="Webhooks"),
        name="webhook-list",
    ),
    re_path(
        r"^webhooks/(?P<pk>[0-9]+)/?$",
        WebhookViewSet.as_view({"get": "retrieve", "delete": "destroy"}, name="Webhook"),
        name="webhook-detail",
    ),
    re_path(
        r"^webhooks/(?P<pk>[0-9]+)/deliveries/?$",
        WebhookViewSet.as_view({"get": "deliveries"}, name="Webhook deliveries"),
        name="webhook-deliveries",
    ),
]
