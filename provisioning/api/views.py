from axes.helpers import get_cool_off
from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import FileResponse
from django.utils.cache import add_never_cache_headers
from django.utils.decorators import method_decorator
from django.views.decorators.cache import never_cache
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_view
from rest_framework import exceptions, generics, mixins, parsers, permissions, status, viewsets
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.decorators import action
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from .. import services
from ..engines import UnknownKind, engines, get_engine
from ..models import Instance, Snapshot, Webhook
from ..options import describe_size
from ..services import lifetime, tokens, webhooks
from .fleet import MayChangeInstances
from .pagination import InstancePagination
from .parsers import MultiPartParser
from .schema import InstanceSchema, KindSchema
from .serializers import (
    AccessTokenSerializer,
    CreateAccessTokenSerializer,
    CreatedInstanceSerializer,
    DeliverySerializer,
    EventSerializer,
    ExtendSerializer,
    ImportSerializer,
    InstanceSerializer,
    NewAccessTokenSerializer,
    NewWebhookSerializer,
    RestoreSerializer,
    SnapshotSerializer,
    UsageSerializer,
    WebhookSerializer,
    change_serializer,
    create_serializer,
)
from .throttles import LoginAddressThrottle, LoginUsernameThrottle, TokenCreateThrottle


@extend_schema_view(
    list=extend_schema(summary="List my instances of this kind"),
    retrieve=extend_schema(summary="One instance"),
)
class InstanceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Instances of the signed-in user, of the kind in the path. Other users' instances do not exist here."""

    schema = InstanceSchema()
    pagination_class = InstancePagination
    parser_classes = [parsers.JSONParser, parsers.FormParser, MultiPartParser]

    def initial(self, request, *args, **kwargs):
        # Any kind fits the URL pattern; only registered ones exist, whoever asks.
        try:
            get_engine(kwargs["kind"])
        except UnknownKind as exc:
            raise exceptions.NotFound(str(exc)) from None
        super().initial(request, *args, **kwargs)

    def get_view_name(self) -> str:
        """The browsable API's title: the route's name with the engine's label, e.g. "<Label> instances".

        Breadcrumbs build views without a request, hence without a kind: they get "Instances".
        """
        kind = getattr(self, "kwargs", {}).get("kind")
        label = engines()[kind].label if kind in engines() else ""
        title = (self.name or "{label} instances").format(label=label).strip()
        return title[:1].upper() + title[1:]

    def get_serializer_class(self):
        # By the route, not the action: the browsable API's form (on "list") and OPTIONS ("metadata")
        # ask for the POST serializer too.
        if self.request.method == "POST" and self.action_map.get("post") == "create":
            return create_serializer(get_engine(self.kwargs["kind"]))
        return InstanceSerializer

    def get_queryset(self):
        instances = Instance.objects.visible().filter(kind=self.kwargs["kind"])
        if not (self.action == "move" and MayChangeInstances().has_permission(self.request, self)):
            instances = instances.filter(owner=self.request.user)  # a move is an operator's; the rest, the owner's
        if self.action in ("list", "retrieve"):  # they never show passwords: skip decrypting them
            instances = services.with_first_base(instances.defer("password", "admin_password"))
        return instances

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "wait",
                float,
                description="Seconds (at most STOCKROOM_MAX_WAIT, 60 by default) to wait for the instance to run: "
                "then the answer is 201 with its connection details under `config`. If it is not running by then "
                "(or the portal has too many requests waiting already), the answer is 202, as without `wait`.",
            )
        ],
        responses={201: CreatedInstanceSerializer, 202: InstanceSerializer},
        summary="Create an instance; it starts in the background, or from the warm pool at once",
    )
    def create(self, request, kind: str):
        _refuse_too_large(request)
        wait = _wait_seconds(request)
        # The serializer shapes the input (a form's text to numbers, blanks to defaults); the
        # engine validates it in the service, and its errors name the field.
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        options = dict(serializer.validated_data)
        name = options.pop("name", None)
        source = options.pop("from_snapshot", None)
        origin, until = options.pop("from_instance", None), options.pop("time", None)
        upload = options.pop("file", None)
        life = {key: options.pop(key) for key in lifetime.FIELDS if key in options}
        if upload is not None and (origin is not None or source is not None):
            raise exceptions.ValidationError({"file": "Give either a file or a clone's source, not both."})
        snapshot = None if source is None else _own_snapshot(request, kind, source)
        if origin is not None and snapshot is not None:
            raise exceptions.ValidationError({"from_instance": "Give either from_snapshot or from_instance, not both."})
        if until is not None and origin is None:
            raise exceptions.ValidationError({"time": "A time goes with from_instance."})
        source_instance = None if origin is None else self.get_queryset().filter(pk=origin).first()
        if origin is not None and source_instance is None:
            raise exceptions.NotFound(f"You have no {kind} instance {origin}.")
        create = {"owner": request.user, "kind": kind, "name": name, "options": options, "lifetime": life}
        if upload is not None:
            instance = services.create_from_file(file_name=upload.name, upload=upload, size=upload.size, **create)
        else:
            instance = services.create_instance(
                **create, from_snapshot=snapshot, from_instance=source_instance, until=until
            )
        if wait:
            instance = services.wait_until_started(instance, wait)
        if wait is not None and instance.status == "running":
            return Response(dict(CreatedInstanceSerializer(instance).data), status=status.HTTP_201_CREATED)
        # A plain dict: the browsable API then offers an empty create form again, not this answer.
        return Response(dict(InstanceSerializer(instance).data), status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "apply",
                str,
                enum=["now"],
                description="`now`: also restart the instance, so that options waiting for a restart take effect.",
            )
        ],
        responses={202: InstanceSerializer, 400: None, 403: None, 404: None, 409: None, 503: None},
        summary="Change an instance: options (live or at the next restart), name",
    )
    def partial_update(self, request, kind: str, pk: int):
        """A JSON merge patch: a field left out stays, null puts its default back. Live options are
        set on the running server and read back before the answer; restart ones wait in
        `pending_options`; create-only ones are refused (400). A change of memory changes the
        server's memory limit and reservation too (403 past your quota, 503 past the host's room)."""
        instance = self.get_object()
        apply = request.query_params.get("apply")
        if apply not in (None, "now"):
            raise exceptions.ValidationError({"apply": f"{apply!r} is not allowed; the only value is 'now'."})
        serializer = change_serializer(get_engine(kind))(data=request.data)
        serializer.is_valid(raise_exception=True)
        patch = dict(serializer.validated_data)
        nested = patch.pop("options", {})
        if both := sorted(set(nested) & set(patch)):
            raise exceptions.ValidationError({name: "Given both at the top level and under options." for name in both})
        name = patch.pop("name", None)
        lifetime = {key: patch.pop(key) for key in services.LIFETIME_FIELDS if key in patch}
        instance = services.change_instance(
            instance=instance, options={**nested, **patch}, name=name, lifetime_fields=lifetime, by=request.user
        )
        if apply == "now" and instance.pending_options and instance.status == "running":
            instance = services.request_action(instance=instance, action="restart", by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        responses={202: InstanceSerializer, 409: None},
        summary="Delete an instance and its data",
        description="A before-delete snapshot is kept. 409 while it is busy, or protected: clear `protected` first.",
    )
    def destroy(self, request, kind: str, pk: int):
        instance = services.delete_instance(instance=self.get_object(), by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(summary="Connection details and configuration")
    @action(detail=True, methods=["get"])
    @method_decorator(never_cache)  # it shows the password: "Cache-Control: no-store"
    def config(self, request, kind: str, pk: int):
        instance = self.get_object()
        if instance.port is None:
            raise services.WrongStatus(instance, "connect to")
        return Response(get_engine(kind).connection(instance))

    @extend_schema(
        request=ExtendSerializer,
        responses={200: InstanceSerializer, 400: None, 404: None, 409: None},
        summary="Move the instance's expiry",
        description='`expires_in` from now, or `expires_at` (after now); null or "never" for never. '
        "instance.expiring is sent again STOCKROOM_EXPIRY_WARNING before the new expiry. Allowed in any live "
        "status but deleting; the history records the change.",
    )
    @action(detail=True, methods=["post"])
    def extend(self, request, kind: str, pk: int):
        instance = self.get_object()
        serializer = ExtendSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        instance = services.extend_expiry(instance=instance, data=serializer.validated_data, by=request.user)
        return Response(InstanceSerializer(instance).data)

    def _act(self, request, kind: str, pk: int, action: str):
        instance = services.request_action(instance=self.get_object(), action=action, by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer, 409: None})
    @action(detail=True, methods=["post"])
    def stop(self, request, kind: str, pk: int):
        """Stop the server; data is kept. Allowed while running or unhealthy."""
        return self._act(request, kind, pk, "stop")

    @extend_schema(request=None, responses={202: InstanceSerializer, 409: None})
    @action(detail=True, methods=["post"])
    def start(self, request, kind: str, pk: int):
        """Start a stopped server."""
        return self._act(request, kind, pk, "start")

    @extend_schema(request=None, responses={202: InstanceSerializer, 409: None})
    @action(detail=True, methods=["post"])
    def restart(self, request, kind: str, pk: int):
        """Restart the server. Allowed while running or unhealthy."""
        return self._act(request, kind, pk, "restart")

    @extend_schema(request=None, responses={202: InstanceSerializer, 409: None})
    @action(detail=True, methods=["post"], url_path="rotate-password")
    def rotate_password(self, request, kind: str, pk: int):
        """Give the user a new random password; the old one stops working."""
        return self._act(request, kind, pk, "rotate-password")

    @extend_schema(
        methods=["GET"], responses=SnapshotSerializer(many=True), summary="The instance's snapshots, newest first"
    )
    @extend_schema(
        methods=["POST"],
        request=None,
        responses={202: SnapshotSerializer, 403: None, 409: None},
        summary="Take a snapshot; it is made in the background while the instance serves on",
    )
    @action(detail=True, methods=["get", "post"])
    def snapshots(self, request, kind: str, pk: int):
        instance = self.get_object()
        if request.method == "POST":
            snapshot = services.request_snapshot(instance=instance, by=request.user)
            return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)
        page = self.paginate_queryset(instance.snapshots.all())
        return self.get_paginated_response(SnapshotSerializer(page, many=True).data)

    @extend_schema(request=RestoreSerializer, responses={202: InstanceSerializer, 404: None, 409: None})
    @action(detail=True, methods=["post"])
    def restore(self, request, kind: str, pk: int):
        """Put a snapshot's data in place of the instance's, or its data as of a time in its
        recovery window: `restoring`, then `running`, with the same credentials, on a new timeline.
        Allowed while running or unhealthy; a time outside the window is refused (400)."""
        instance = self.get_object()
        serializer = RestoreSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        if "time" in serializer.validated_data:
            try:
                instance = services.request_restore(
                    instance=instance, until=serializer.validated_data["time"], by=request.user
                )
            except services.OutsideWindow as exc:
                raise exceptions.ValidationError({"time": [str(exc)]}) from None
        else:
            snapshot = _own_snapshot(request, kind, serializer.validated_data["snapshot"])
            instance = services.request_restore(instance=instance, snapshot=snapshot, by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer, 404: None, 409: None})
    @action(detail=True, methods=["post"])
    def evacuate(self, request, kind: str, pk: int):
        """Rebuild an `unreachable` instance (its host is out of reach) on another host from its last
        ready snapshot: `moving`, then `running` at a new host and port, with the same credentials.
        Whatever was written after that snapshot is lost; its status says from when. 409 unless it
        is unreachable, or when it has no ready snapshot."""
        instance = services.request_evacuation(instance=self.get_object(), by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request=None,
        responses={202: InstanceSerializer, 403: None, 404: None, 409: None},
        summary="Move a running instance to another node, with its data (staff)",
    )
    @action(detail=True, methods=["post"])
    def move(self, request, kind: str, pk: int):
        """Move a `running` instance, anyone's, to the node with the most room, on a backend that
        places servers on many hosts (a Docker Swarm): `moving`, then `running` at a new host and
        port with its data and credentials; its writes pause meanwhile, and an `instance.moved`
        webhook says where it went. If no other node has room, or the move fails, it runs on where
        it was and its status says why. Staff who may change instances only: where a server runs is
        the operators' choice, so an owner gets 403 for their own instance (404 for any other). 409
        unless it is running, or on a backend with one host."""
        instance = self.get_object()
        if not MayChangeInstances().has_permission(request, self):
            raise exceptions.PermissionDenied("Only staff who may change instances move one to another node.")
        instance = services.request_move(instance=instance, by=request.user)
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        request={"multipart/form-data": ImportSerializer},
        responses={202: InstanceSerializer, 400: None, 404: None, 409: None, 413: None},
        summary="Load a file into the instance (a SQL dump, an RDB file)",
    )
    @action(detail=True, methods=["post"], url_path="import", parser_classes=[MultiPartParser])
    def import_file(self, request, kind: str, pk: int):
        """Load an uploaded file (multipart part `file`) into the running instance: `importing`,
        then `running`. A snapshot taken first undoes it; a file that is cut short or asks for
        rights the tenant lacks is refused and leaves the data as it was (the instance's history
        says why). Larger than STOCKROOM_IMPORT_MAX_BYTES: 413."""
        instance = self.get_object()
        _refuse_too_large(request)
        serializer = ImportSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        upload = serializer.validated_data["file"]
        instance = services.request_import(
            instance=instance, name=upload.name, upload=upload, size=upload.size, by=request.user
        )
        return Response(InstanceSerializer(instance).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(responses=EventSerializer(many=True))
    @action(detail=True, methods=["get"])
    def events(self, request, kind: str, pk: int):
        """The instance's status history, oldest first, paginated."""
        page = self.paginate_queryset(self.get_object().events.all())
        return self.get_paginated_response(EventSerializer(page, many=True).data)


def _refuse_too_large(request) -> None:
    """413 before the body is read, when its length says the file cannot fit the import limit
    (a multipart body holds a little more than its file)."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return
    if length > settings.STOCKROOM_IMPORT_MAX_BYTES + MULTIPART_SLACK:
        raise services.ImportTooLarge(
            f"The request takes {describe_size(length)}; an import may take at most "
            f"{describe_size(settings.STOCKROOM_IMPORT_MAX_BYTES)} (STOCKROOM_IMPORT_MAX_BYTES)."
        )


MULTIPART_SLACK = 64 * 1024  # bytes of a multipart body besides its file: boundaries, headers, fields


def _own_snapshot(request, kind: str, pk: int) -> Snapshot:
    """The user's snapshot of this kind; any other does not exist here (404)."""
    snapshot = Snapshot.objects.filter(owner=request.user, kind=kind, pk=pk).first()
    if snapshot is None:
        raise exceptions.NotFound(f"You have no {kind} snapshot {pk}.")
    return snapshot


@extend_schema_view(
    list=extend_schema(
        summary="List my snapshots of this kind, those of deleted instances included",
        parameters=[OpenApiParameter("instance", int, description="Only the snapshots of this instance (its id).")],
    ),
    retrieve=extend_schema(summary="One snapshot"),
    destroy=extend_schema(summary="Delete a snapshot and its file", responses={204: None, 409: None}),
)
class SnapshotViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """Snapshots of the signed-in user's instances of the kind in the path. Other users' do not exist here."""

    schema = KindSchema()
    serializer_class = SnapshotSerializer

    def initial(self, request, *args, **kwargs):
        try:
            get_engine(kwargs["kind"])
        except UnknownKind as exc:
            raise exceptions.NotFound(str(exc)) from None
        super().initial(request, *args, **kwargs)

    def get_queryset(self):
        snapshots = Snapshot.objects.filter(owner=self.request.user, kind=self.kwargs["kind"])
        if self.action == "list" and "instance" in self.request.query_params:
            instance = self.request.query_params["instance"]
            if not (instance.isascii() and instance.isdigit()):
                raise exceptions.ValidationError({"instance": ["Expected an instance id (a whole number)."]})
            # Beyond the largest id the database holds there is no instance (and SQLite would overflow).
            snapshots = snapshots.filter(instance_id=int(instance)) if int(instance) < 2**63 else snapshots.none()
        return snapshots

    def perform_destroy(self, instance):
        services.delete_snapshot(snapshot=instance)

    @extend_schema(
        summary="Download the snapshot as a portable file",
        description="The kind's portable file: a gzipped `mariadb-dump` of the tenant's database (`.sql.gz`), or "
        "the RDB (`.rdb`). Made while the request waits (a snapshot that is not itself that file is loaded into "
        "a throwaway server first), then streamed with `Content-Disposition: attachment`. 409 if the snapshot is "
        "not ready or its file is damaged.",
        responses={(200, "application/octet-stream"): bytes, 404: None, 409: None},
    )
    @action(detail=True, methods=["get"])
    def download(self, request, kind: str, pk: int):
        made = services.export_snapshot(snapshot=self.get_object())
        return FileResponse(made.file, as_attachment=True, filename=made.filename, content_type=made.media_type)

    @extend_schema(
        request=None,
        responses={202: SnapshotSerializer, 404: None, 409: None},
        summary="Verify the snapshot: restore it into a throwaway server and check it there",
        description="`verify_status` goes `verifying`, then `passed` or `failed` with `verify_message` saying "
        "what was found, and `verified_at` when. The checksum of the stored file is compared first.",
    )
    @action(detail=True, methods=["post"])
    def verify(self, request, kind: str, pk: int):
        snapshot = services.request_verify(snapshot=self.get_object(), by=request.user)
        return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)


@extend_schema_view(
    list=extend_schema(summary="List my webhooks"),
    retrieve=extend_schema(summary="One webhook"),
    destroy=extend_schema(summary="Delete a webhook; its deliveries go with it"),
)
class WebhookViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet
):
    """URLs told about every status change of the user's instances. Other users' webhooks do not exist here."""

    serializer_class = WebhookSerializer

    def get_queryset(self):
        return Webhook.objects.filter(owner=self.request.user)

    @extend_schema(responses={201: NewWebhookSerializer}, summary="Register a webhook; the answer holds its secret")
    @method_decorator(never_cache)  # the secret: "Cache-Control: no-store"
    def create(self, request):
        serializer = WebhookSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        webhook, secret = webhooks.create_webhook(owner=request.user, url=serializer.validated_data["url"])
        webhook.secret = secret
        return Response(NewWebhookSerializer(webhook).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses=DeliverySerializer(many=True))
    @action(detail=True, methods=["get"])
    def deliveries(self, request, pk: int):
        """What was sent to this webhook and how it went, newest first, paginated."""
        deliveries = self.get_object().deliveries.select_related("event__instance")
        page = self.paginate_queryset(deliveries)
        return self.get_paginated_response(DeliverySerializer(page, many=True).data)


class UsageView(generics.GenericAPIView):
    serializer_class = UsageSerializer

    @extend_schema(summary="What I hold against my quotas")
    def get(self, request):
        """Instances that hold data (failed ones whose data is kept included) against the count
        quota, and the memory they reserve against the memory quota. A create or start that would
        go past either is refused with 403."""
        return Response(UsageSerializer(services.usage(request.user)).data)


def _shown_once(token, secret: str, status_code: int) -> Response:
    token.token = secret
    response = Response(NewAccessTokenSerializer(token).data, status=status_code)
    add_never_cache_headers(response)  # the secret must not stay in any cache on the way
    return response


class ObtainTokenView(APIView):
    """A username and password for a new token, as `{"token": "…"}` (with its id, name and expiry).

    Each call issues a new token named "api-token" with the default lifetime (STOCKROOM_TOKEN_TTL):
    the old single token per user could be shown again, a hashed one cannot. Throttled per address
    and per user name; every attempt counts, right or wrong.
    """

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = [LoginAddressThrottle, LoginUsernameThrottle]
    parser_classes = [parsers.JSONParser, parsers.FormParser, MultiPartParser]
    serializer_class = AuthTokenSerializer

    def check_throttles(self, request):
        """Stop at the first throttle that refuses (DRF asks them all): a request refused for its
        address must not write a count for its user name, or one address could flood the shared
        cache with new keys until it culls live counts."""
        for throttle in self.get_throttles():
            if not throttle.allow_request(request, self):
                self.throttled(request, throttle.wait())

    @extend_schema(request=AuthTokenSerializer, responses={200: NewAccessTokenSerializer}, summary="Get a token")
    def post(self, request):
        serializer = AuthTokenSerializer(data=request.data, context={"request": request})
        if not serializer.is_valid():
            if getattr(request, "axes_locked_out", False) or getattr(request._request, "axes_locked_out", False):
                # The sign-in lock-out (django-axes), which the pages share: even the right password.
                cool_off = get_cool_off(request._request)
                raise exceptions.Throttled(
                    wait=cool_off.total_seconds() if cool_off else None,
                    detail="Too many failed sign-ins for this user name or from this address. "
                    + ("Try again later." if cool_off else "Ask an operator to unlock it."),
                )
            raise exceptions.ValidationError(serializer.errors)
        token, secret = tokens.create_token(owner=serializer.validated_data["user"], name=tokens.LOGIN_TOKEN_NAME)
        return _shown_once(token, secret, status.HTTP_200_OK)


@extend_schema_view(
    list=extend_schema(summary="List my tokens (never their secrets)"),
    destroy=extend_schema(summary="Revoke a token; it stops working at once"),
)
class AccessTokenViewSet(mixins.ListModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet):
    """The signed-in user's API tokens. Other users' tokens do not exist here."""

    serializer_class = AccessTokenSerializer
    throttle_classes = [TokenCreateThrottle]

    def get_queryset(self):
        return tokens.tokens_of(self.request.user)

    @extend_schema(
        request=CreateAccessTokenSerializer,
        responses={201: NewAccessTokenSerializer},
        summary="Create a token; the answer holds its secret, shown once",
    )
    def create(self, request):
        serializer = CreateAccessTokenSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        token, secret = tokens.create_token(owner=request.user, **serializer.validated_data)
        return _shown_once(token, secret, status.HTTP_201_CREATED)

    def perform_destroy(self, instance):
        tokens.revoke_token(token=instance, by=self.request.user)


def exception_handler(exc, context):
    """Turn the services' exceptions into clear 4xx answers."""
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail)
    elif isinstance(exc, services.QuotaExceeded | webhooks.TooManyWebhooks):
        exc = exceptions.PermissionDenied(str(exc), code="quota_exceeded")
    elif isinstance(exc, services.SnapshotBusy | services.ExportFailed | services.NotApplied | services.CannotMove):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    elif isinstance(exc, services.WrongStatus):
        return Response({"detail": str(exc), "status": exc.instance.status}, status=status.HTTP_409_CONFLICT)
    elif isinstance(exc, services.ImportTooLarge):
        return Response({"detail": str(exc)}, status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    elif isinstance(exc, services.NoCapacity):  # no memory or no port left on the host
        return Response({"detail": str(exc)}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
    return drf_exception_handler(exc, context)


def _wait_seconds(request) -> float | None:
    """`?wait=N` of a create: seconds, 0 to STOCKROOM_MAX_WAIT; None when not asked (400 if not a number)."""
    text = request.query_params.get("wait")
    if text is None:
        return None
    limit = settings.STOCKROOM_MAX_WAIT
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= limit:  # NaN fails this too
        raise exceptions.ValidationError({"wait": f"{text!r} is not a number of seconds from 0 to {limit:g}."})
    return seconds
