"""Create forms, generated from the same option definitions the API uses.

Forms only shape the input; validation of values happens once, in the service, and its
errors are put back next to the field.
"""

from functools import cache

from django import forms

from .engines import Engine
from .options import Option, format_size


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
    fields.update({option.name: _field(option) for option in engine.options})
    return type(f"{engine.kind.capitalize()}CreateForm", (forms.Form,), fields)


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
