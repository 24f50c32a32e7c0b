import copy
import re
from datetime import UTC
from functools import cache
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import empty
from rest_framework.utils import html

from ..engines import Engine, get_engine
from ..models import AccessToken, DeliveryStatus, Instance, Snapshot, Webhook, WebhookDelivery
from ..options import APPLY_TEXT, Option, format_size
from ..services import lifetime, recovery_window, tokens, upgrade_available
from ..services.requests import NAME_RULE


class UsageSerializer(serializers.Serializer):
    instances = serializers.IntegerField(help_text="Instances that hold data, failed ones whose data is kept included.")
    instance_quota = serializers.IntegerField(help_text="The most instances you may hold.")
    memory_reserved = serializers.IntegerField(
        help_text="Bytes of memory your instances reserve (all but stopped ones)."
    )
    memory_quota = serializers.IntegerField(help_text="The most bytes of memory your instances may reserve.")
    snapshot_storage = serializers.IntegerField(
        help_text="Bytes your snapshots and archived logs (point-in-time recovery) take in the store."
    )
    snapshot_quota = serializers.IntegerField(help_text="The most bytes your snapshots and archived logs may take.")


class KindField(serializers.CharField):
    """An instance's kind; the schema lists the registered kinds (see schema.py)."""


class InstanceSerializer(serializers.ModelSerializer):
    kind = KindField(read_only=True)

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
            "pending_options",
            "memory_reservation",
            "memory_limit",
            "timings",
            "recovery_window",
            "server_version",
            "upgrade_available",
            "expires_at",
            "protected",
            "stop_when_idle",
            "idle_since",
            "created_at",
            "updated_at",
        ]
        extra_kwargs = {
            "timings": {"help_text": "Seconds each step of the create took, measured by the worker."},
            "server_version": {"help_text": "The version its server reported when it last started (empty until then)."},
            "options": {"help_text": "The options the server runs with now, every one of its engine's."},
            "pending_options": {
                "help_text": "Options changed that take effect at the next restart (PATCH …?apply=now restarts)."
            },
            "expires_at": {
                "help_text": "When it is deleted (a before-delete snapshot kept), unless protected; null: never. "
                "instance.expiring is sent STOCKROOM_EXPIRY_WARNING before. POST …/extend moves it."
            },
            "protected": {"help_text": "Neither expiry nor DELETE (409) removes it until this is cleared."},
            "stop_when_idle": {
                "help_text": "Seconds without a client connection after which it is stopped (data kept); null: never."
            },
            "idle_since": {
                "help_text": "Since when no client has been connected, while stop_when_idle is set and it runs."
            },
        }
        read_only_fields = fields

    upgrade_available = serializers.SerializerMethodField(
        help_text="Restart to upgrade: the host (or the image) now has another server version than the one it runs; "
        "a restart starts the new one and upgrades its data."
    )

    def get_fields(self):
        # Building them from the model is most of the work of serializing a short list: build them
        # once per class and process, and give each serializer a copy (as DRF does its declared ones).
        return copy.deepcopy(_built_fields(type(self)))

    def get_upgrade_available(self, instance: Instance) -> bool:
        return upgrade_available(instance)

    def to_representation(self, instance):
        data = super().to_representation(instance)
        data["options"] = get_engine(instance.kind).with_defaults(instance.options)
        return data

    recovery_window = serializers.SerializerMethodField(
        help_text="The times a restore or clone may go back to, {from, to} in whole seconds (UTC); "
        "null until the first snapshot of its timeline (an in-place restore begins a new one)."
    )

    @extend_schema_field(
        {
            "type": "object",
            "nullable": True,
            "properties": {
                "from": {"type": "string", "format": "date-time"},
                "to": {"type": "string", "format": "date-time"},
            },
        }
    )
    def get_recovery_window(self, instance: Instance) -> dict[str, str] | None:
        window = recovery_window(instance)
        if window is None:
            return None
        start, end = window
        return {"from": start.strftime("%Y-%m-%dT%H:%M:%SZ"), "to": end.strftime("%Y-%m-%dT%H:%M:%SZ")}


@cache
def _built_fields(serializer: type[InstanceSerializer]) -> dict[str, serializers.Field]:
    return super(InstanceSerializer, serializer()).get_fields()


class SnapshotSerializer(serializers.ModelSerializer):
    kind = KindField(read_only=True)
    instance = serializers.IntegerField(
        source="instance_id", allow_null=True, help_text="The instance it was taken of (its id stays once deleted)."
    )

    class Meta:
        model = Snapshot
        fields = [
            "id",
            "kind",
            "instance",
            "instance_name",
            "status",
            "status_message",
            "trigger",
            "size_bytes",
            "checksum",
            "created_at",
            "finished_at",
            "expires_at",
            "verify_status",
            "verify_message",
            "verified_at",
        ]
        read_only_fields = fields


class WholeSecondField(serializers.DateTimeField):
    """An ISO 8601 time, in UTC and cut to its whole second (a time without a zone is UTC)."""

    def to_internal_value(self, value):
        moment = super().to_internal_value(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC).replace(microsecond=0)


class RestoreSerializer(serializers.Serializer):
    snapshot = serializers.IntegerField(
        min_value=1, required=False, help_text="The id of a ready snapshot of yours of this kind."
    )
    time = WholeSecondField(
        required=False,
        help_text="Instead of a snapshot: the time (ISO 8601, cut to its whole second) to bring the data back "
        "to; the restore holds exactly the writes committed before that second began. It must be within the "
        "instance's recovery_window.",
    )

    def validate(self, attrs):
        if ("snapshot" in attrs) == ("time" in attrs):
            raise serializers.ValidationError("Give either a snapshot or a time, not both.")
        return attrs


class EventSerializer(serializers.Serializer):
    """One status change. Fields are built in get_fields because "from" is a Python keyword."""

    def get_fields(self):
        return {
            "time": serializers.DateTimeField(source="created_at"),
            "from": serializers.CharField(source="from_status", help_text="Empty for the first event."),
            "to": serializers.CharField(source="to_status"),
            "reason": serializers.CharField(),
        }


class ShapingField(serializers.Field):
    """Shapes one engine option's input; the engine validates the value, once, in the service.

    Absent means the default, and so does null (documented as nullable). An HTML form sends
    every field, so a blank one counts as absent.
    """

    def __init__(self, option: Option, **kwargs):
        self.option = option
        kwargs.setdefault("initial", option.default)
        kwargs["help_text"] = f"{kwargs.get('help_text', option.help_text)} {APPLY_TEXT[option.apply]}"
        kwargs.setdefault("allow_null", True)
        super().__init__(required=False, label=option.label, **kwargs)

    def run_validation(self, data=empty):
        is_empty, data = self.validate_empty_values(data)
        if is_empty:
            return data
        return self.shape(data, from_form=html.is_html_input(self.root.initial_data))

    def shape(self, data, *, from_form: bool):
        return data


class ChoiceOptionField(ShapingField, serializers.ChoiceField):
    def __init__(self, option: Option, **kwargs):
        super().__init__(option, choices=option.choices, **kwargs)


def _with_range(option: Option) -> str:
    return f"{option.help_text} Allowed: {option.describe_range()}."


class IntegerOptionField(ShapingField, serializers.IntegerField):
    def __init__(self, option: Option, **kwargs):
        super().__init__(option, help_text=_with_range(option), **kwargs)

    def shape(self, data, *, from_form: bool):
        # A form sends text; JSON keeps its own types, so "100" there stays text and is refused.
        if from_form and isinstance(data, str) and re.fullmatch(r"\s*-?[0-9]{1,15}\s*", data):
            return int(data)
        return data


class SizeOptionField(ShapingField, serializers.Field):
    """Bytes as an integer, or a size string such as "256mb"; a text box in the browsable API."""

    def __init__(self, option: Option, **kwargs):
        initial = format_size(option.default) if option.default is not None else None
        super().__init__(option, initial=initial, help_text=_with_range(option), **kwargs)

    def to_representation(self, value):
        return value


class NameField(serializers.CharField):
    """The instance's name; null, absent or (from a form) blank gives a generated one.

    The service checks the pattern; JSON must send a string, as it always had to.
    """

    def __init__(self, *, allow_null: bool = True):
        super().__init__(
            required=False,
            allow_null=allow_null,
            max_length=40,
            initial=None,  # so the browsable API's raw form sends null, not an empty name
            help_text=f"Optional; left out, it is the kind, a hyphen and 6 hex digits. {NAME_RULE}",
        )

    def run_validation(self, data=empty):
        is_empty, data = self.validate_empty_values(data)
        if is_empty:
            return data
        if not isinstance(data, str):
            raise serializers.ValidationError(f"Expected a string, got {type(data).__name__}.")
        return data


class TextOptionField(ShapingField, serializers.Field):
    """A string option ("text", "set"); the engine checks it."""

    def __init__(self, option: Option, **kwargs):
        super().__init__(option, help_text=f"{option.help_text} Allowed: {option.describe_allowed()}.", **kwargs)

    def to_representation(self, value):
        return value


class NumberOptionField(ShapingField, serializers.Field):
    """An integer or a decimal within the option's range."""

    def __init__(self, option: Option, **kwargs):
        super().__init__(option, help_text=_with_range(option), **kwargs)

    def shape(self, data, *, from_form: bool):
        if from_form and isinstance(data, str) and re.fullmatch(r"\s*-?[0-9]{1,9}(\.[0-9]{1,6})?\s*", data):
            return float(data) if "." in data else int(data)
        return data

    def to_representation(self, value):
        return value


OPTION_FIELDS = {
    "choice": ChoiceOptionField,
    "int": IntegerOptionField,
    "size": SizeOptionField,
    "set": TextOptionField,
    "text": TextOptionField,
    "number": NumberOptionField,
}


class LifetimeField(serializers.Field):
    """One of an instance's lifetime words (expires_in, expires_at, stop_when_idle), passed as it is
    to services/lifetime.py, which reads and checks it. From a form, a blank one is left out.
    Its schema is in schema.py."""

    def __init__(self, *, form: bool = False, **kwargs):
        super().__init__(required=False, allow_null=not form, **kwargs)

    def get_value(self, dictionary):
        if html.is_html_input(dictionary) and dictionary.get(self.field_name) == "":
            return empty  # left out, not null (which says "never")
        return super().get_value(dictionary)

    def to_internal_value(self, data):
        return data

    def to_representation(self, value):
        return value


def expiry_fields(*, default: str = "", form: bool = False) -> dict[str, serializers.Field]:
    """expires_in and expires_at, as the create and extend bodies take them."""
    return {
        "expires_in": LifetimeField(
            form=form,
            help_text=f"Delete the instance this long from now: {lifetime.EXPIRES_IN_RULE}. Not with expires_at."
            + default,
        ),
        "expires_at": LifetimeField(
            form=form, help_text=f"Delete the instance at this time: {lifetime.EXPIRES_AT_RULE}. Not with expires_in."
        ),
    }


def lifetime_fields(*, form: bool) -> dict[str, serializers.Field]:
    """What a create body may say of the instance's lifetime (services/lifetime.py reads it)."""
    return {
        **expiry_fields(default=" Neither given: STOCKROOM_DEFAULT_TTL (empty: never).", form=form),
        "protected": serializers.BooleanField(
            required=False, help_text="Neither expiry nor DELETE (409) removes it until cleared. Default: false."
        ),
        "stop_when_idle": LifetimeField(
            form=form,
            help_text=f"Stop it (data kept) after this long with no client connected: {lifetime.STOP_WHEN_IDLE_RULE}.",
        ),
    }


class ExtendSerializer(serializers.Serializer):
    """The body of POST …/extend: one of the two."""

    form = False

    def get_fields(self):
        return expiry_fields()


class CreateInstanceSerializer(serializers.Serializer):
    """Base of each engine's create serializer: its options and a name.

    Keys that are not fields are passed on too, so the engine names them as unknown options.
    """

    engine: Engine
    # The variant that only describes a form body in the schema: a form cannot send null, and a
    # blank field means its default. Requests of every media type use the other one.
    form = False
    default_error_messages = {"invalid": "Expected a JSON object of options."}

    def to_internal_value(self, data):
        shaped = super().to_internal_value(data)
        ignored = {"csrfmiddlewaretoken"} if html.is_html_input(data) else set()  # the browsable API's form
        unknown = {key: data.get(key) for key in data if key not in self.fields and key not in ignored}
        return {**unknown, **shaped}


@cache
def create_serializer(engine: Engine, *, form: bool = False) -> type[CreateInstanceSerializer]:
    """The create serializer for one engine, built from its options once per engine object."""
    fields = {
        "name": NameField(allow_null=not form),
        **{option.name: OPTION_FIELDS[option.kind](option, allow_null=not form) for option in engine.options},
        "from_snapshot": serializers.IntegerField(
            required=False,
            allow_null=not form,
            min_value=1,
            help_text="A clone: the id of a ready snapshot of yours of this kind, whose data the new instance "
            "starts with, with new credentials. Its source's options apply unless given here.",
        ),
        "from_instance": serializers.IntegerField(
            required=False,
            allow_null=not form,
            min_value=1,
            help_text="A clone of an instance of yours of this kind as it was at `time` (within its "
            "recovery_window), with new credentials.",
        ),
        "time": WholeSecondField(
            required=False, allow_null=not form, help_text="With from_instance: the time to clone it as of."
        ),
        "file": serializers.FileField(
            required=False,
            allow_null=not form,
            allow_empty_file=True,
            help_text="A clone from a file (multipart): the new instance starts with its data, as an import "
            f"loads it ({' or '.join(engine.import_suffixes) or 'none for this kind'}).",
        ),
        **lifetime_fields(form=form),
    }
    name = f"{engine.kind.capitalize()}Create{'Form' if form else ''}Serializer"
    return type(name, (CreateInstanceSerializer,), {"engine": engine, "form": form, **fields})


class ChangeInstanceSerializer(serializers.Serializer):
    """Base of each engine's PATCH body: a JSON merge patch of the instance. A field left out stays
    as it is; null puts its default back. Options go at the top level (as in a create) or under
    `options` (as the instance shows them)."""

    engine: Engine
    form = False
    default_error_messages = {"invalid": "Expected a JSON object: a merge patch of the instance."}

    def to_internal_value(self, data):
        if hasattr(data, "keys"):
            ignored = {"csrfmiddlewaretoken"} if html.is_html_input(data) else set()
            if unknown := [key for key in data if key not in self.fields and key not in ignored]:
                allowed = ", ".join(self.fields)
                raise serializers.ValidationError(
                    {key: [f"Not a field a change takes; allowed: {allowed}."] for key in unknown}
                )
        return super().to_internal_value(data)


@cache
def change_serializer(engine: Engine) -> type[ChangeInstanceSerializer]:
    """The PATCH body for one engine, built from its options once per engine object."""
    fields = {
        "name": StrictCharField(required=False, max_length=40, help_text=f"A new name. {NAME_RULE}"),
        "options": serializers.DictField(
            required=False, help_text="Options as the instance shows them (the same as giving them at the top level)."
        ),
        **{option.name: OPTION_FIELDS[option.kind](option) for option in engine.options},
        **expiry_fields(default=" Left out: unchanged; null: never."),
        "protected": serializers.BooleanField(
            required=False, help_text="Neither expiry nor DELETE (409) removes it until cleared."
        ),
        "stop_when_idle": LifetimeField(
            form=False,
            help_text=f"Stop it (data kept) after this long with no client connected: {lifetime.STOP_WHEN_IDLE_RULE}.",
        ),
    }
    name = f"{engine.kind.capitalize()}ChangeSerializer"
    return type(name, (ChangeInstanceSerializer,), {"engine": engine, **fields})


class CreatedInstanceSerializer(InstanceSerializer):
    """A create that waited (`?wait=N`) for the instance to run: the instance, and how to connect."""

    config = serializers.SerializerMethodField(help_text="What GET …/config answers: host, port, user, password.")

    class Meta(InstanceSerializer.Meta):
        fields = [*InstanceSerializer.Meta.fields, "config"]

    def get_config(self, instance: Instance) -> dict[str, Any]:
        return get_engine(instance.kind).connection(instance)


@cache
def config_serializer(engine: Engine) -> type[serializers.Serializer]:
    """Describes `engine.connection()`'s answer, field by field, for the schema."""
    fields = {
        name: serializers.IntegerField() if python_type is int else serializers.CharField()
        for name, python_type in engine.connection_fields.items()
    }
    return type(f"{engine.kind.capitalize()}ConfigSerializer", (serializers.Serializer,), fields)


class WebhookSerializer(serializers.ModelSerializer):
    class Meta:
        model = Webhook
        fields = ["id", "url", "created_at", "legacy_signature"]
        read_only_fields = ["id", "created_at", "legacy_signature"]
        extra_kwargs = {"url": {"validators": [], "help_text": "Where events are POSTed: an http(s) URL."}}


class NewWebhookSerializer(WebhookSerializer):
    secret = serializers.CharField(
        read_only=True,
        help_text=(
            "whsec_ + base64 of the signing key: verify the webhook-signature header (Standard Webhooks) with it."
            " Shown once."
        ),
    )

    class Meta(WebhookSerializer.Meta):
        fields = [*WebhookSerializer.Meta.fields, "secret"]


class DeliverySerializer(serializers.ModelSerializer):
    instance = serializers.SerializerMethodField()
    event = EventSerializer(read_only=True)
    message_id = serializers.CharField(
        source="msg_id", read_only=True, help_text="Its webhook-id header, the same on every attempt."
    )
    attempts = serializers.IntegerField(read_only=True, help_text="Attempts started (counted before sending).")

    class Meta:
        model = WebhookDelivery
        fields = ["id", "message_id", "instance", "event", "status", "attempts", "response_code", "error",
                  "next_attempt_at"]  # fmt: skip
        read_only_fields = fields

    def to_representation(self, delivery):
        data = super().to_representation(delivery)
        if delivery.status != DeliveryStatus.PENDING:
            data["next_attempt_at"] = None
        return data

    def get_instance(self, delivery) -> dict:
        instance = delivery.event.instance
        return {"id": instance.pk, "kind": instance.kind, "name": instance.name}


class AccessTokenSerializer(serializers.ModelSerializer):
    """A token as its owner sees it in a list: never its secret."""

    expires = serializers.DateTimeField(source="expiry", read_only=True, help_text="null: never.")
    expired = serializers.BooleanField(read_only=True)

    class Meta:
        model = AccessToken
        fields = ["id", "name", "created", "expires", "expired", "last_used"]
        read_only_fields = fields


class NewAccessTokenSerializer(AccessTokenSerializer):
    token = serializers.CharField(
        read_only=True, help_text="Send it as `Authorization: Token <token>`. Shown once: only its hash is kept."
    )

    class Meta(AccessTokenSerializer.Meta):
        fields = [*AccessTokenSerializer.Meta.fields, "token"]


class StrictCharField(serializers.CharField):
    """A string, and only a string: JSON's 5 is not a name."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            raise serializers.ValidationError(f"Expected a string, got {type(data).__name__}.")
        return super().to_internal_value(data)


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 1}], "nullable": True})
class ExpiresInField(serializers.Field):
    """A token's lifetime: a string the token service reads, or a whole number of days."""

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, str | int):
            raise serializers.ValidationError(f"Expected {tokens.expiry_rule()}.")
        return data

    def to_representation(self, value):
        return value


class CreateAccessTokenSerializer(serializers.Serializer):
    """The body of POST /api/auth/tokens; the token service checks both fields."""

    name = StrictCharField(max_length=tokens.NAME_MAX, help_text="What the token is for, e.g. 'ci'.")
    expires_in = ExpiresInField(
        required=False,
        allow_null=True,
        help_text="Days (90), a duration (12h, 30d, 2w) or 'never' (if the portal allows it). "
        "Left out or null: STOCKROOM_TOKEN_TTL.",
    )


class ImportSerializer(serializers.Serializer):
    """An import's body (multipart/form-data)."""

    file = serializers.FileField(
        allow_empty_file=True,
        help_text="A file of the kind's import format (its suffixes are in the README); "
        "at most STOCKROOM_IMPORT_MAX_BYTES.",
    )
