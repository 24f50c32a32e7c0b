from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from rest_framework import serializers

from ..engines import engines, get_engine
from ..models import DeliveryStatus, Instance, Webhook, WebhookDelivery
from ..options import Option


class InstanceSerializer(serializers.ModelSerializer):
    class Meta:
        model = Instance
        fields = [
            "id",
            "name",
            "kind",
            "status",
            "status_message",
            "host",
            "port",
            "options",
            "memory_reservation",
            "memory_limit",
            "timings",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {"timings": {"help_text": "Seconds each step of the create took, measured by the worker."}}
        read_only_fields = fields


class EventSerializer(serializers.Serializer):
    """One status change. Fields are built in get_fields because "from" is a Python keyword."""

    def get_fields(self):
        return {
            "time": serializers.DateTimeField(source="created_at"),
            "from": serializers.CharField(source="from_status", help_text="Empty for the first event."),
            "to": serializers.CharField(source="to_status"),
            "reason": serializers.CharField(),
        }


class OptionField(serializers.Field):
    """Documents one engine option; values are validated by the option itself in the service."""

    def __init__(self, option: Option, **kwargs):
        self.option = option
        super().__init__(required=False, help_text=option.help_text, label=option.label, **kwargs)

    def to_internal_value(self, data):
        return data

    def to_representation(self, value):
        return value


class OptionFieldSchema(OpenApiSerializerFieldExtension):
    target_class = OptionField

    def map_serializer_field(self, auto_schema, direction):
        option = self.target.option
        if option.kind == "choice":
            schema = {"type": "string", "enum": list(option.choices)}
        elif option.kind == "size":
            schema = {
                "oneOf": [
                    {"type": "integer", "minimum": option.min_value, "maximum": option.max_value},
                    {"type": "string", "example": "256mb"},
                ]
            }
        else:
            schema = {"type": "integer", "minimum": option.min_value, "maximum": option.max_value}
        if option.default is not None:
            schema["default"] = option.default
        return {**schema, "description": option.help_text}


def _create_serializer(kind: str) -> type[serializers.Serializer]:
    fields = {option.name: OptionField(option) for option in get_engine(kind).options}
    fields["name"] = serializers.CharField(required=False, help_text="Defaults to '<kind>-<6 hex digits>'.")
    return type(f"{kind.capitalize()}CreateSerializer", (serializers.Serializer,), fields)


CREATE_SERIALIZERS = {kind: _create_serializer(kind) for kind in engines()}


class MySQLConfigSerializer(serializers.Serializer):
    host = serializers.CharField()
    port = serializers.IntegerField()
    database = serializers.CharField()
    username = serializers.CharField()
    password = serializers.CharField()
    charset = serializers.CharField()
    collation = serializers.CharField()
    binlog_format = serializers.CharField()
    uri = serializers.CharField()


class RedisConfigSerializer(serializers.Serializer):
    host = serializers.CharField()
    port = serializers.IntegerField()
    password = serializers.CharField()
    maxmemory = serializers.IntegerField()
    maxmemory_policy = serializers.CharField()
    maxclients = serializers.IntegerField()
    appendfsync = serializers.CharField()
    uri = serializers.CharField()


class WebhookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Webhook
        fields = ["id", "url", "created_at"]
        read_only_fields = ["id", "created_at"]
        extra_kwargs = {"url": {"validators": [], "help_text": "Where events are POSTed: an http(s) URL."}}


class NewWebhookSerializer(WebhookSerializer):
    secret = serializers.CharField(
        read_only=True,
        help_text="Verify the X-Stockroom-Signature header (sha256=HMAC-SHA256 of the body) with it. Shown once.",
    )

    class Meta(WebhookSerializer.Meta):
        fields = [*WebhookSerializer.Meta.fields, "secret"]


class DeliverySerializer(serializers.ModelSerializer):
    instance = serializers.SerializerMethodField()
    event = EventSerializer(read_only=True)

    class Meta:
        model = WebhookDelivery
        fields = ["id", "instance", "event", "status", "attempts", "response_code", "error", "next_attempt_at"]
        read_only_fields = fields

    def to_representation(self, delivery):
        data = super().to_representation(delivery)
        if delivery.status != DeliveryStatus.PENDING:
            data["next_attempt_at"] = None
        return data

    def get_instance(self, delivery) -> dict:
        instance = delivery.event.instance
        return {"id": instance.pk, "kind": instance.kind, "name": instance.name}
