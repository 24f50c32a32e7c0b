"""The OpenAPI schema of the instance routes, asked of the engine registry each time it is built.

Nothing here is computed at import: a newly registered engine shows up in the next schema.
"""

from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers

from ..engines import engines
from ..services.requests import NAME_PATTERN
from .serializers import (
    ChangeInstanceSerializer,
    CreateInstanceSerializer,
    KindField,
    LifetimeField,
    NameField,
    ShapingField,
    change_serializer,
    config_serializer,
    create_serializer,
)

BLANK = ""


class TokenScheme(OpenApiAuthenticationExtension):
    """`Authorization: Token <secret>`, as DRF's own token scheme was named in the schema."""

    target_class = "provisioning.api.authentication.TokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(header_name="Authorization", token_prefix="Token")


class AnyOf(serializers.Serializer):
    """Schema only: a body or answer in the shape of one engine; the path's kind says which.

    anyOf rather than oneOf: a body of defaults ({}) fits every engine.
    """

    def __init__(self, component_name: str, choices: list[type[serializers.Serializer]]):
        super().__init__()
        self.component_name = component_name
        self.choices = choices


class AnyOfSchema(OpenApiSerializerExtension):
    target_class = AnyOf

    def get_name(self, auto_schema, direction):
        return self.target.component_name

    def get_identity(self, auto_schema, direction):
        return (self.target.component_name, tuple(self.target.choices))

    def map_serializer(self, auto_schema, direction):
        return {"anyOf": [auto_schema.resolve_serializer(choice, direction).ref for choice in self.target.choices]}


class CreateInstanceSchema(OpenApiSerializerExtension):
    target_class = CreateInstanceSerializer
    match_subclasses = True

    def get_name(self, auto_schema, direction):
        return f"{self.target.engine.kind.capitalize()}Create{'Form' if self.target.form else ''}"

    def map_serializer(self, auto_schema, direction):
        engine = self.target.engine
        schema = auto_schema._map_basic_serializer(self.target, direction)
        # The engine refuses options it does not know.
        schema["additionalProperties"] = False
        schema["description"] = f"A new {engine.label} instance (kind `{engine.kind}`): its name and options."
        if self.target.form:
            schema["description"] += " In a form, a blank field means its default."
        if "file" in schema.get("properties", {}):  # a file, sent as a part of a multipart body
            schema["properties"]["file"] = {
                "type": "string",
                "format": "binary",
                "description": self.target.fields["file"].help_text,
            }
        return schema


class ChangeInstanceSchema(OpenApiSerializerExtension):
    target_class = ChangeInstanceSerializer
    match_subclasses = True

    def get_name(self, auto_schema, direction):
        return f"{self.target.engine.kind.capitalize()}Change"

    def map_serializer(self, auto_schema, direction):
        engine = self.target.engine
        schema = auto_schema._map_basic_serializer(self.target, direction)
        schema["additionalProperties"] = False
        schema["description"] = (
            f"A JSON merge patch of a {engine.label} instance: a field left out stays, null puts its default back. "
            "Each option's x-apply says how a change takes effect: live, restart (pending until the next restart) "
            "or create-only (refused)."
        )
        return schema


class OptionFieldSchema(OpenApiSerializerFieldExtension):
    target_class = ShapingField
    match_subclasses = True

    def map_serializer_field(self, auto_schema, direction):
        option = self.target.option
        bounds = {"minimum": option.min_value, "maximum": option.max_value}
        # null in JSON, a blank in a form: like leaving the option out, it means its default.
        default = BLANK if self.target.parent.form else None
        if option.kind == "choice":
            schema = {"type": "string", "enum": [*option.choices, default]}
        elif option.kind in ("set", "text"):
            schema = {"type": "string", "maxLength": 200}
        elif option.kind == "number":
            schema = {"type": "number", **bounds}
            if self.target.parent.form:
                schema = {"anyOf": [schema, {"type": "string"}]}
        elif option.kind == "size":  # a blank is a string too
            schema = {"oneOf": [{"type": "integer", **bounds}, {"type": "string", "example": "256mb"}]}
        elif self.target.parent.form:
            schema = {"anyOf": [{"type": "integer", **bounds}, {"type": "string", "enum": [BLANK]}]}
        else:
            schema = {"type": "integer", **bounds}
        if option.default is not None:
            schema["default"] = option.default
        schema["x-apply"] = option.apply  # live, restart or create-only: how a change after create applies
        return schema


class NameFieldSchema(OpenApiSerializerFieldExtension):
    target_class = NameField

    def map_serializer_field(self, auto_schema, direction):
        pattern = f"({NAME_PATTERN.pattern})?" if self.target.parent.form else NAME_PATTERN.pattern
        return {"type": "string", "pattern": f"^{pattern}$", "maxLength": self.target.max_length}


class LifetimeFieldSchema(OpenApiSerializerFieldExtension):
    """expires_in, expires_at or stop_when_idle: text (stop_when_idle also whole seconds); null in
    JSON for never, a blank in a form for the default."""

    target_class = LifetimeField

    def map_serializer_field(self, auto_schema, direction):
        name = self.target.field_name
        if name == "expires_at":
            schema: dict = {"type": "string", "format": "date-time"}
        elif name == "stop_when_idle":
            schema = {"oneOf": [{"type": "string", "example": "30m"}, {"type": "integer", "minimum": 60}]}
        else:
            schema = {"type": "string", "example": "2h"}
        if not getattr(self.target.parent, "form", False):
            schema["nullable"] = True
        return schema


class KindFieldSchema(OpenApiSerializerFieldExtension):
    target_class = KindField

    def map_serializer_field(self, auto_schema, direction):
        return {"type": "string", "enum": list(engines())}


def kind_parameter() -> OpenApiParameter:
    kinds = ", ".join(f"`{kind}` ({engine.label})" for kind, engine in engines().items())
    return OpenApiParameter(
        "kind", str, OpenApiParameter.PATH, enum=list(engines()), description=f"The kind of instance: {kinds}."
    )


class KindSchema(AutoSchema):
    """The kind in every path, one of the registered engines'."""

    def get_override_parameters(self):
        return [kind_parameter(), *super().get_override_parameters()]


class InstanceSchema(KindSchema):
    """The kind in every path, the create body and the config answer, per registered engine."""

    def get_request_serializer(self):
        if getattr(self.view, "action", None) == "partial_update":
            return AnyOf("ChangeInstance", [change_serializer(engine) for engine in engines().values()])
        if getattr(self.view, "action", None) == "create":
            json = AnyOf("CreateInstance", [create_serializer(engine) for engine in engines().values()])
            form = AnyOf("CreateInstanceForm", [create_serializer(engine, form=True) for engine in engines().values()])
            return {
                "application/json": json,
                "application/x-www-form-urlencoded": form,
                "multipart/form-data": form,
            }
        return super().get_request_serializer()

    def get_response_serializers(self):
        if getattr(self.view, "action", None) == "config":
            return AnyOf("InstanceConfig", [config_serializer(engine) for engine in engines().values()])
        return super().get_response_serializers()
