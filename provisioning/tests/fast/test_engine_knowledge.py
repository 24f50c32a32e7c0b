"""What makes a kind lives in its engine folder: no other module of the app names a kind."""

import re
from pathlib import Path

from django.conf import settings

from provisioning.engines import engines

APP = Path(settings.BASE_DIR) / "provisioning"
ALLOWED = ("engines", "tests", "migrations")


def test_no_module_outside_the_engines_names_a_kind():
    names = {word for kind, engine in engines().items() for word in (kind, engine.label)}
    pattern = re.compile("|".join(re.escape(name) for name in names), re.IGNORECASE)
    found = [
        f"{path.relative_to(APP)}:{number}: {line.strip()}"
        for path in sorted(APP.rglob("*.py"))
        if path.relative_to(APP).parts[0] not in ALLOWED
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if pattern.search(line)
    ]
    assert not found, "kind-specific code outside provisioning/engines/:\n" + "\n".join(found)
