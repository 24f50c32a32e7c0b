"""The fleet's nodes, for staff only: list them, pause, activate or drain one (services/fleet.py)."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, permissions, serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from ..services import fleet


class NodeSerializer(serializers.Serializer):
    backend = serializers.CharField(help_text="The alias of the backend (STOCKROOM_BACKENDS) the node is in.")
    id = serializers.CharField(help_text="The node's id in its backend: the path of its actions.")
    hostname = serializers.CharField()
    address = serializers.CharField(help_text="Where the portal reaches the node.")
    public_host = serializers.CharField(help_text="Where users connect to its instances.")
    state = serializers.CharField(help_text="ready, down, unknown or disconnected.")
    availability = serializers.CharField(help_text="active (takes new instances), pause or drain.")
    role = serializers.CharField(help_text="manager or worker.")
    labelled = serializers.BooleanField(help_text="Carries the node label: instances may be placed on it.")
    memory = serializers.IntegerField(help_text="Bytes of memory the node has.")
    reserved = serializers.IntegerField(
        help_text="Bytes the portal's instances there reserve (all live ones but stopped)."
    )
    instances = serializers.IntegerField(help_text="The portal's live instances on the node.")
    detail = serializers.CharField(required=False, help_text="After an action: what was done.")


class BackendErrorSerializer(serializers.Serializer):
    backend = serializers.CharField()
    detail = serializers.CharField(help_text="Why its nodes could not be listed.")


class NodesSerializer(serializers.Serializer):
    nodes = NodeSerializer(many=True)
    unavailable = BackendErrorSerializer(many=True, help_text="Backends whose manager could not be asked.")


class MayViewInstances(permissions.IsAdminUser):
    """Staff who may view instances (the admin's "view" or "change instance" permission, as the
    admin's Nodes page asks): other staff get 403."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        return super().has_permission(request, view) and (
            user.has_perm("provisioning.view_instance") or user.has_perm("provisioning.change_instance")
        )


class MayChangeInstances(permissions.IsAdminUser):
    """Staff who may change instances (the admin's "change instance" permission), as in the admin:
    staff who may only look get 403."""

    def has_permission(self, request, view) -> bool:
        return super().has_permission(request, view) and request.user.has_perm("provisioning.change_instance")


class NodesView(APIView):
    permission_classes = [MayViewInstances]
    serializer_class = NodesSerializer

    @extend_schema(
        summary="The nodes of the backends that place instances on many hosts (staff)",
        responses={200: NodesSerializer, 403: OpenApiResponse(description="Not staff who may view instances.")},
    )
    def get(self, request):
        """Every node of every backend that places instances on many hosts (a Docker Swarm), with
        what the portal's instances reserve there. A backend whose manager does not answer is
        listed under `unavailable`, with why; the others' nodes still show. Staff who may view
        instances only, as on the admin's Nodes page."""
        rows = fleet.nodes()
        body = {
            "nodes": [row for row in rows if not row.error],
            "unavailable": [{"backend": row.backend, "detail": row.error} for row in rows if row.error],
        }
        return Response(NodesSerializer(body).data)


class NodeActionView(APIView):
    permission_classes = [MayChangeInstances]
    serializer_class = NodeSerializer

    @extend_schema(
        request=None,
        parameters=[
            OpenApiParameter("node_id", str, OpenApiParameter.PATH, description="The node's `id`, as listed."),
            OpenApiParameter("action", str, OpenApiParameter.PATH, enum=list(fleet.ACTIONS)),
        ],
        responses={
            200: NodeSerializer,
            403: OpenApiResponse(description="Not staff who may change instances."),
            404: OpenApiResponse(description="No such node."),
            503: OpenApiResponse(description="The node's backend could not be asked, or refused."),
        },
        summary="Pause a node (no new instances), drain it (move its instances off) or activate it (staff)",
    )
    def post(self, request, node_id: str, action: str):
        """`pause`: the node takes no new instances; those on it keep running. `drain`: paused, and each
        running instance of the portal's on it moves to another node with its data (`moving`, then
        `running` at its new host and port; an `instance.moved` webhook says where). `activate`: it
        takes new instances again. The answer is the node as it is then, and `detail`. Staff who may
        change instances only."""
        try:
            alias = fleet.locate(node_id)
            row, said = fleet.act(alias, node_id, action, by=request.user)
        except fleet.UnknownNode as exc:
            raise exceptions.NotFound(str(exc)) from None
        except fleet.FleetUnavailable as exc:
            return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response({**NodeSerializer(row).data, "detail": said})
