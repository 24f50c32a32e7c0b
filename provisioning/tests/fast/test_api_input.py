"""What the API accepts as its schema says: forms and JSON alike, nulls, paging, unknown kinds.

Plain regression tests for what the contract test (test_contract.py) found, and the browsable
API's own pages. Run inside a transaction that is rolled back, so no job is ever queued.
"""

import re

import pytest
from django.test import Client
from rest_framework.test import APIClient

from provisioning.engines import engines, get_engine
from provisioning.models import Instance

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024


def schema(client) -> dict:
    return client.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()


@pytest.fixture
def browser(alice) -> Client:
    """A signed-in person looking at the browsable API."""
    client = Client(HTTP_ACCEPT="text/html")
    client.force_login(alice)
    return client


# Nulls and defaults ----------------------------------------------------------------------


def test_a_null_name_gets_a_generated_one_as_the_schema_says(api, client):
    response = api.post("/api/storage/redis/instances", {"name": None}, format="json")
    assert response.status_code == 202
    assert re.fullmatch(r"redis-[0-9a-f]{6}", response.json()["name"])
    assert schema(client)["components"]["schemas"]["RedisCreate"]["properties"]["name"]["nullable"] is True


def test_a_null_option_means_its_default(api):
    response = api.post("/api/storage/redis/instances", {"maxclients": None, "maxmemory": None}, format="json")
    assert response.status_code == 202
    assert response.json()["options"]["maxclients"] == 1000
    assert response.json()["options"]["maxmemory"] == 64 * MiB


def test_an_empty_name_in_json_is_still_refused(api):
    response = api.post("/api/storage/redis/instances", {"name": ""}, format="json")
    assert response.status_code == 400
    assert "not a valid name" in response.json()["name"][0]


# Forms and JSON alike --------------------------------------------------------------------


def test_a_form_encoded_create_gets_numbers_and_sizes(api):
    body = {"name": "cache", "maxclients": "50", "maxmemory": "128mb", "maxmemory_policy": "allkeys-lru"}
    response = api.post("/api/storage/redis/instances", body, format="multipart")
    assert response.status_code == 202, response.content
    options = response.json()["options"]
    assert options["maxclients"] == 50
    assert options["maxmemory"] == 128 * MiB
    assert options["maxmemory_policy"] == "allkeys-lru"


def test_a_url_encoded_create_treats_blank_fields_as_defaults(api):
    response = api.post(
        "/api/storage/redis/instances",
        "name=&maxclients=&maxmemory=&maxmemory_policy=&appendfsync=always",
        content_type="application/x-www-form-urlencoded",
    )
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["name"].startswith("redis-")
    defaults = {option.name: option.default for option in get_engine("redis").options}
    assert body["options"] == {**defaults, "appendfsync": "always"}


def test_the_schema_says_a_blank_form_field_is_its_default(client):
    document = schema(client)
    body = document["paths"]["/api/storage/{kind}/instances/"]["post"]["requestBody"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/CreateInstance"}
    for form in ("application/x-www-form-urlencoded", "multipart/form-data"):
        assert body[form]["schema"] == {"$ref": "#/components/schemas/CreateInstanceForm"}
    fields = document["components"]["schemas"]["RedisCreateForm"]["properties"]
    assert re.fullmatch(fields["name"]["pattern"], "")
    assert {"type": "string", "enum": [""]} in fields["maxclients"]["anyOf"]
    assert not any(field.get("nullable") for field in fields.values())  # a form cannot send null


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ({"maxclients": "many"}, "maxclients", "not an integer"),
        ({"maxclients": "0"}, "maxclients", "1 to 10000"),
        ({"maxmemory": "9gb"}, "maxmemory", "1mb to 4gb"),
        ({"maxmemory_policy": "lru"}, "maxmemory_policy", "allkeys-lru"),
        ({"maxclient": "5"}, "maxclient", "maxmemory, maxmemory_policy, maxclients, appendfsync"),
    ],
)
def test_a_form_gets_the_engines_messages_at_the_field(api, body, field, hint):
    response = api.post("/api/storage/redis/instances", body, format="multipart")
    assert response.status_code == 400
    assert hint in " ".join(response.json()[field])
    assert not Instance.objects.exists()


def test_json_keeps_its_types(api):
    """A number in a string is text in JSON, as it always was; only forms have nothing but text."""
    response = api.post("/api/storage/redis/instances", {"maxclients": "50"}, format="json")
    assert response.status_code == 400
    assert "not an integer" in response.json()["maxclients"][0]


def test_the_browsable_apis_form_token_is_not_an_option(browser):
    token = {"csrfmiddlewaretoken": "ignored", "maxclients": "20"}
    response = browser.post("/api/storage/redis/instances", token)  # force_login skips the CSRF check
    assert response.status_code == 202
    assert Instance.objects.get().options["maxclients"] == 20


# Paging ----------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", ["null", "", "0", "-1", "two", "1.5", "５"])
@pytest.mark.parametrize("path", ["/api/storage/redis/instances", "/api/webhooks"])
def test_a_page_size_that_is_not_a_whole_number_is_refused(api, path, page_size):
    response = api.get(path, {"page_size": page_size})
    assert response.status_code == 400
    assert "page_size" in response.json()


def test_a_page_size_given_twice_is_refused(api):
    assert api.get("/api/storage/redis/instances?page_size=5&page_size=5").status_code == 400


def test_a_page_size_above_the_most_gives_the_most(api, alice):
    Instance.objects.bulk_create(
        Instance(owner=alice, kind="redis", name=f"r{i}", host="127.0.0.1", port=40000 + i, username="default")
        for i in range(101)
    )
    assert len(api.get("/api/storage/redis/instances?page_size=1000").json()["results"]) == 100


# Kinds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "/1", "/1/config", "/1/events", "/1/stop"])
def test_an_unknown_kind_is_404_for_everyone(api, path):
    assert api.get(f"/api/storage/postgres/instances{path}").status_code == 404
    assert api.post(f"/api/storage/postgres/instances{path}", {}).status_code == 404
    assert APIClient().get(f"/api/storage/postgres/instances{path}").status_code == 404


def test_the_schema_lists_the_registered_kinds(client):
    document = schema(client)
    create = document["paths"]["/api/storage/{kind}/instances/"]["post"]
    kind = next(parameter for parameter in create["parameters"] if parameter["name"] == "kind")
    assert kind["schema"]["enum"] == list(engines())
    bodies = document["components"]["schemas"]["CreateInstance"]["anyOf"]
    assert bodies == [{"$ref": f"#/components/schemas/{k.capitalize()}Create"} for k in engines()]
    answers = document["components"]["schemas"]["InstanceConfig"]["anyOf"]
    assert answers == [{"$ref": f"#/components/schemas/{k.capitalize()}Config"} for k in engines()]


def test_each_create_body_is_the_engines_options_a_name_a_source_to_clone_and_a_lifetime(client):
    schemas = schema(client)["components"]["schemas"]
    for kind, engine in engines().items():
        body = schemas[f"{kind.capitalize()}Create"]
        assert set(body["properties"]) == {option.name for option in engine.options} | {
            "name",
            "from_snapshot",
            "from_instance",
            "time",
            "file",
            "expires_in",
            "expires_at",
            "protected",
            "stop_when_idle",
        }
        assert body["additionalProperties"] is False
        assert "required" not in body


def test_each_config_answer_is_the_engines_connection_fields(client):
    schemas = schema(client)["components"]["schemas"]
    for kind, engine in engines().items():
        answer = schemas[f"{kind.capitalize()}Config"]
        assert set(answer["required"]) == set(engine.connection_fields)
        for name, python_type in engine.connection_fields.items():
            assert answer["properties"][name]["type"] == {int: "integer", str: "string"}[python_type]


# The browsable API -----------------------------------------------------------------------


def title(page) -> str:
    return re.search(r"<h1>(.*?)</h1>", page.content.decode()).group(1)


def test_the_browsable_api_titles_say_what_each_page_is(browser, api):
    pk = api.post("/api/storage/redis/instances", {}, format="json").json()["id"]
    hook = api.post("/api/webhooks", {"url": "https://ci.example.com/hook"}).json()["id"]
    assert title(browser.get("/api/storage/redis/instances")) == "Redis instances"
    assert title(browser.get("/api/storage/mysql/instances/")) == "MySQL instances"
    assert title(browser.get(f"/api/storage/redis/instances/{pk}")) == "Redis instance"
    assert title(browser.get(f"/api/storage/redis/instances/{pk}/events")) == "Redis instance: history"
    assert title(browser.get("/api/webhooks")) == "Webhooks"
    assert title(browser.get(f"/api/webhooks/{hook}")) == "Webhook"
    assert title(browser.get(f"/api/webhooks/{hook}/deliveries")) == "Webhook deliveries"


def test_the_browsable_api_form_has_the_engines_fields(browser):
    page = browser.get("/api/storage/redis/instances").content.decode()
    form = page.split('id="post-object-form"', 1)[1].split("</form>", 1)[0]
    assert '<select class="form-control" name="maxmemory_policy">' in form
    assert '<option value="allkeys-lru"' in form
    assert "What Redis does when the memory limit is reached." in form
    assert re.search(r'<input name="maxclients" class="form-control" type="number"\s+value="1000"', form)
    assert re.search(r'<input name="maxmemory" class="form-control" type="text"\s+value="64mb"', form)
    assert '<input name="name"' in form


def test_the_browsable_api_raw_form_posts_as_it_is(browser, api):
    """Its prefilled JSON is the defaults and a null name, which the API accepts."""
    page = browser.get("/api/storage/mysql/instances").content.decode()
    raw = re.search(r'<textarea name="_content"[^>]*>(.*?)</textarea>', page, re.DOTALL).group(1)
    body = raw.replace("&quot;", '"')
    assert '"name": null' in body
    assert api.post("/api/storage/mysql/instances", body, content_type="application/json").status_code == 202


def test_options_describes_the_create_body(api):
    post = api.options("/api/storage/mysql/instances").json()["actions"]["POST"]
    assert list(post) == [
        "name",
        *(option.name for option in get_engine("mysql").options),
        "from_snapshot",
        "from_instance",
        "time",
        "file",
        "expires_in",
        "expires_at",
        "protected",
        "stop_when_idle",
    ]
    assert {choice["value"] for choice in post["charset"]["choices"]} == {"utf8mb4", "latin1", "ascii"}


def test_a_garbled_multipart_body_is_refused_not_read_as_defaults(api):
    boundary = "cffb83d850ebbbdd69409d506a91c72f"
    response = api.post(
        "/api/storage/mysql/instances",
        f"--{boundary}\r\n3644820410--{boundary}--\r\n",
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    assert response.status_code == 400
    assert "named part" in response.json()["detail"]
    assert not Instance.objects.exists()


@pytest.mark.parametrize(
    "query", ["page=", "page=last", "page=1&page=1", "page=0", "page=two", "page=%2B1", "page=%D9%A1"]
)
@pytest.mark.parametrize("path", ["/api/storage/redis/instances", "/api/webhooks"])
def test_a_page_that_is_not_a_page_number_does_not_exist(api, path, query):
    assert api.get(f"{path}?{query}").status_code == 404
    assert api.get(f"{path}?page=1").status_code == 200
