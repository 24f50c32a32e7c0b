"""Create forms, generated from the same option definitions the API uses.

Forms only shape the input; validation of values happens once, in the service, and its
errors are put back next to the field.
"""

from functools import cache
from typing import Any

from django import forms

from .engines import Engine
from .options import APPLY_TEXT, CREATE_ONLY, LIVE, RESTART, Option, format_size

LIFETIME_FIELDS = ("expires_in", "stop_when_idle", "protected")


def lifetime_fields() -> dict[str, forms.Field]:
    """A throwaway instance's words: services/lifetime.py checks them, as it does the API's."""
    text = {"autocomplete": "off", "placeholder": "never"}
    return {
        "expires_in": forms.CharField(
            required=False,
            label="Expires in",
            widget=forms.TextInput(attrs=text),
            help_text="Delete it (a snapshot kept) after this long, e.g. 2h, 7d or never. Blank: the default.",
        ),
        "stop_when_idle": forms.CharField(
            required=False,
            label="Stop when idle",
            widget=forms.TextInput(attrs=text),
            help_text="Stop it (data kept) after this long without a client connection, e.g. 30m. Blank: never.",
        ),
        "protected": forms.BooleanField(
            required=False, help_text="Neither expiry nor a delete removes it until you clear this."
        ),
    }


def _field(option: Option) -> forms.Field:
    label, help_text = option.label, option.help_text
    if option.kind == "choice":
        choices = [(value, value) for value in option.choices]
        if option.default is None:
            choices.insert(0, ("", "Default"))
        return forms.ChoiceField(
            choices=choices, initial=option.default, label=label, help_text=help_text, required=False
        )
    if option.kind == "size":
        return forms.CharField(
            initial=format_size(option.default),
            widget=forms.TextInput(attrs={"placeholder": "e.g. 256mb"}),
            label=label,
            help_text=help_text,
            required=False,
        )
    if option.kind in ("set", "text"):
        return forms.CharField(initial=option.default, label=label, help_text=help_text, required=False)
    if option.kind == "number":
        return forms.FloatField(initial=option.default, label=label, help_text=help_text, required=False)
    return forms.IntegerField(initial=option.default, label=label, help_text=help_text, required=False)


@cache
def create_form_class(engine: Engine) -> type[forms.Form]:
    """The create form for one engine, built from its options once per engine object."""
    fields: dict[str, forms.Field] = {
        "name": forms.CharField(
            required=False,
            max_length=40,
            help_text="Optional. Lower-case letters, digits and hyphens.",
            widget=forms.TextInput(attrs={"placeholder": f"{engine.kind}-…", "autocomplete": "off"}),
        )
    }
    for option in engine.options:
        field = fields[option.name] = _field(option)
        field.help_text = f"{field.help_text} {APPLY_TEXT[option.apply]}"
    fields.update(lifetime_fields())
    return type(f"{engine.kind.capitalize()}CreateForm", (forms.Form,), fields)


APPLY_LABEL = {LIVE: "live", RESTART: "on restart", CREATE_ONLY: "set at create"}


@cache
def change_form_class(engine: Engine) -> type[forms.Form]:
    """The settings form of an instance: every option, each marked with how a change applies;
    create-only ones shown and not editable. A blank field puts the option's default back."""
    fields: dict[str, forms.Field] = {
        "name": forms.CharField(
            max_length=40,
            help_text="Lower-case letters, digits and hyphens.",
            widget=forms.TextInput(attrs={"autocomplete": "off"}),
        )
    }
    for option in engine.options:
        field = _field(option)
        field.label = f"{option.label} ({APPLY_LABEL[option.apply]})"
        field.disabled = option.apply == CREATE_ONLY
        field.widget.attrs["data-apply"] = option.apply
        fields[option.name] = field
    return type(f"{engine.kind.capitalize()}ChangeForm", (forms.Form,), fields)


def change_form_initial(engine: Engine, options: dict[str, Any], name: str) -> dict[str, Any]:
    """What the settings form shows: the options as they will be after a restart."""
    initial: dict[str, Any] = {"name": name}
    for option in engine.options:
        value = options.get(option.name)
        initial[option.name] = format_size(value) if option.kind == "size" and isinstance(value, int) else value
    return initial


class TokenForm(forms.Form):
    """A new API token: its name and lifetime; the token service checks both."""

    name = forms.CharField(
        max_length=100,
        help_text="What it is for, e.g. ci or laptop.",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )
    expires_in = forms.CharField(
        required=False,
        label="Expires in",
        widget=forms.TextInput(attrs={"autocomplete": "off"}),
    )
