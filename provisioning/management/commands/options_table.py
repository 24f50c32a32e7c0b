from django.core.management.base import BaseCommand

from provisioning.engines import engines
from provisioning.options import CREATE_ONLY, LIVE, RESTART, format_size


def options_markdown() -> str:
    """The README's table of options, built from the engines' own definitions."""
    rows = ["| kind | option | default | allowed | change after create | meaning |", "|---|---|---|---|---|---|"]
    for kind, engine in engines().items():
        for option in engine.options:
            if option.default is None:
                default = "(see meaning)"
            elif option.kind == "size":
                default = f"`{format_size(option.default)}`"
            elif option.default == "":
                default = "(empty)"
            else:
                default = f"`{option.default}`"
            allowed = option.describe_allowed().replace(", ", " · ")
            change = {LIVE: "live", RESTART: "on restart", CREATE_ONLY: "no (create-only)"}[option.apply]
            rows.append(f"| {kind} | `{option.name}` | {default} | {allowed} | {change} | {option.help_text} |")
    return "\n".join(rows) + "\n"


class Command(BaseCommand):
    help = "Print the Markdown table of instance options that the README embeds."

    def handle(self, *args, **options):
        self.stdout.write(options_markdown(), ending="")
