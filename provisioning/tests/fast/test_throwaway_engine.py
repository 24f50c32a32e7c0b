"""An engine registered in settings gets every front door without a line changed elsewhere:
its API URLs, its OpenAPI entries, its create form, its dashboard button and its README row.
(No worker runs here, so no server is started: the fast tier's transaction is never committed.)

Nothing is reloaded: URLs, schema, serializers and forms ask the registry when they are used.
"""

from typing import Any

import pytest

from provisioning.engines import Engine
from provisioning.management.commands.options_table import options_markdown
from provisioning.options import Option
from provisioning.templatetags.engines import engine_label

pytestmark = pytest.mark.django_db


class Throwaway(Engine):
    """Just enough of an engine for the front doors; it starts no server."""

    kind = "memo"
    label = "Memo"
    username = "memo"
    connection_fields = {"host": str, "port": int, "uri": str}
    options = (
        Option("flavour", "Flavour", "How it tastes.", kind="choice", default="plain", choices=("plain", "salted")),
        Option("slots", "Slots", "Entries kept at once.", kind="int", default=8, min_value=1, max_value=64),
    )

    def memory_reservation(self, options: dict[str, Any]) -> int:
        return options["slots"] * 1024 * 1024

    def memory_limit(self, options: dict[str, Any]) -> int:
        return options["slots"] * 2 * 1024 * 1024

    def connection(self, instance) -> dict[str, Any]:
        return {"host": instance.host, "port": instance.port, "uri": f"memo://{instance.host}:{instance.port}"}


@pytest.fixture
def registered(settings):
    settings.STOCKROOM_ENGINES = [*settings.STOCKROOM_ENGINES, f"{__name__}.Throwaway"]


@pytest.fixture
def web(client, alice):
    client.force_login(alice)
    return client


def schema(client) -> dict:
    return client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


def test_its_api_urls_answer(registered, api):
    response = api.get("/api/storage/memo/instances")
    assert response.status_code == 200
    assert response.json() == {"count": 0, "next": None, "previous": None, "results": []}
    assert api.get("/api/storage/memo/instances/").status_code == 200
    assert api.get("/api/storage/memo/instances/1").status_code == 404  # none of alice's
    assert api.get("/api/storage/nosuch/instances").status_code == 404


def test_its_openapi_entries_are_generated(registered, client):
    document = schema(client)
    create = document["paths"]["/api/storage/{kind}/instances/"]["post"]
    kind = next(parameter for parameter in create["parameters"] if parameter["name"] == "kind")
    assert "memo" in kind["schema"]["enum"]
    schemas = document["components"]["schemas"]
    assert {"$ref": "#/components/schemas/MemoCreate"} in schemas["CreateInstance"]["anyOf"]
    body = schemas["MemoCreate"]
    assert set(body["properties"]) == {"flavour", "slots", "name", "from_snapshot", "from_instance", "time", "file"} | {
        "expires_in",
        "expires_at",
        "protected",
        "stop_when_idle",
    }
    assert body["properties"]["slots"] | {"type": "integer", "minimum": 1, "maximum": 64} == body["properties"]["slots"]
    assert body["properties"]["slots"]["default"] == 8
    flavours = next(s for s in schemas.values() if set(s.get("enum", ())) == {"plain", "salted"})
    assert flavours["type"] == "string"
    assert {"$ref": "#/components/schemas/MemoConfig"} in schemas["InstanceConfig"]["anyOf"]
    assert set(schemas["MemoConfig"]["required"]) == {"host", "port", "uri"}


def test_its_create_form_and_button_are_generated(registered, web):
    form = web.get("/new/memo/")
    assert form.status_code == 200
    page = form.content.decode()
    assert "New Memo" in page
    for text in ('name="flavour"', 'value="salted"', "How it tastes.", 'name="slots"', 'value="8"', 'name="name"'):
        assert text in page
    dashboard = web.get("/").content.decode()
    assert 'href="/new/memo/">New Memo</a>' in dashboard


def test_its_browsable_api_form_is_generated(registered, web):
    page = web.get("/api/storage/memo/instances", HTTP_ACCEPT="text/html").content.decode()
    assert "<h1>Memo instances</h1>" in page
    assert '<select class="form-control" name="flavour">' in page
    assert '<input name="slots" class="form-control" type="number"' in page


def test_its_readme_row_is_generated(registered):
    table = options_markdown()
    assert "| memo | `flavour` | `plain` | plain · salted | on restart | How it tastes. |" in table
    assert "| memo | `slots` | `8` | 1 to 64 | on restart | Entries kept at once. |" in table


def test_it_is_created_and_shown_like_any_other(registered, api, web):
    created = api.post("/api/storage/memo/instances", {"flavour": "salted", "name": "notes"}, format="json")
    assert created.status_code == 202, created.content
    assert created.json()["kind"] == "memo"
    assert created.json()["options"] == {"flavour": "salted", "slots": 8}
    assert api.get("/api/storage/memo/instances").json()["count"] == 1
    assert "<h1>Memo <span" in web.get(f"/instances/{created.json()['id']}/").content.decode()
    assert '<td data-label="Kind">Memo</td>' in web.get("/").content.decode()


def test_its_options_are_checked_by_the_engine(registered, api):
    as_json = api.post("/api/storage/memo/instances", {"slots": 65}, format="json")
    as_form = api.post("/api/storage/memo/instances", "slots=65", content_type="application/x-www-form-urlencoded")
    for refused in (as_json, as_form):
        assert refused.status_code == 400
        assert "1 to 64" in refused.json()["slots"][0]
    assert "plain, salted" in api.post("/api/storage/memo/instances", {"flavour": "sweet"}).json()["flavour"][0]


def test_pages_show_its_label(registered):
    assert engine_label("memo") == "Memo"
    assert engine_label("nosuch") == "nosuch"


def test_an_engine_that_is_not_registered_has_no_front_door(api, web, client):
    assert api.get("/api/storage/memo/instances").status_code == 404
    assert web.get("/new/memo/").status_code == 404
    assert "| memo |" not in options_markdown()
    assert "MemoCreate" not in schema(client)["components"]["schemas"]
