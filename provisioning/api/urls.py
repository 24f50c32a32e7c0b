from django.urls import re_path
from rest_framework.authtoken.views import obtain_auth_token

from .views import InstanceViewSet, WebhookViewSet

# Trailing slashes are optional on every path.
urlpatterns = [
    re_path(r"^auth/token/?$", obtain_auth_token, name="api-token"),
    re_path(
        r"^storage/(?P<kind>mysql|redis)/instances/?$",
        InstanceViewSet.as_view({"get": "list", "post": "create"}),
        name="instance-list",
    ),
    re_path(
        r"^storage/(?P<kind>mysql|redis)/instances/(?P<pk>[0-9]+)/?$",
        InstanceViewSet.as_view({"get": "retrieve", "delete": "destroy"}),
        name="instance-detail",
    ),
    re_path(
        r"^storage/(?P<kind>mysql|redis)/instances/(?P<pk>[0-9]+)/config/?$",
        InstanceViewSet.as_view({"get": "config"}),
        name="instance-config",
    ),
    re_path(
        r"^storage/(?P<kind>mysql|redis)/instances/(?P<pk>[0-9]+)/events/?$",
        InstanceViewSet.as_view({"get": "events"}),
        name="instance-events",
    ),
    *[
        re_path(
            rf"^storage/(?P<kind>mysql|redis)/instances/(?P<pk>[0-9]+)/{action}/?$",
            InstanceViewSet.as_view({"post": action.replace("-", "_")}),
            name=f"instance-{action}",
        )
        for action in ("stop", "start", "restart", "rotate-password")
    ],
    re_path(r"^webhooks/?$", WebhookViewSet.as_view({"get": "list", "post": "create"}), name="webhook-list"),
    re_path(
        r"^webhooks/(?P<pk>[0-9]+)/?$",
        WebhookViewSet.as_view({"get": "retrieve", "delete": "destroy"}),
        name="webhook-detail",
    ),
    re_path(
        r"^webhooks/(?P<pk>[0-9]+)/deliveries/?$",
        WebhookViewSet.as_view({"get": "deliveries"}),
        name="webhook-deliveries",
    ),
]
