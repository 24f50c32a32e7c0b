"""A person's path through the pages, in real headless Chromium, with a real worker."""

import os
import shutil
from pathlib import Path

import pymysql
import pytest
import redis
from django.conf import settings

from provisioning.engines import get_engine
from provisioning.models import Instance

from .conftest import wait_for_status

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not shutil.which("chromium") and not os.environ.get("CI"), reason="chromium is not installed"),
]
# Playwright's sync API runs an event loop in this thread; the ORM calls here are in tests only.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

ARTIFACTS = Path(settings.BASE_DIR) / "test-artifacts"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"],
        )  # fmt: skip
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server, alice, worker):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{live_server.url}/")
    page.fill("#id_username", "alice")
    page.fill("#id_password", "correct-horse-battery")
    page.click("button[type=submit]")
    page.wait_for_url(f"{live_server.url}/")
    yield page
    context.close()


def shoot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def create_through_the_form(page, live_server, kind: str, fields: dict[str, str]) -> int:
    page.click(f"text=New {get_engine(kind).label}")
    for selector, value in fields.items():
        if page.locator(selector).evaluate("e => e.tagName") == "SELECT":
            page.select_option(selector, value)
        else:
            page.fill(selector, value)
    shoot(page, f"create-{kind}")
    page.click("main button[type=submit]")
    page.wait_for_url(f"{live_server.url}/instances/*/")
    return int(page.url.rstrip("/").rsplit("/", 1)[1])


def wait_running_without_reload(page) -> None:
    page.evaluate("window.__sameDocument = true")
    page.wait_for_selector("#status:text('running')", timeout=60_000)
    assert page.evaluate("window.__sameDocument") is True, "the page was reloaded"


def delete_through_the_page(page, live_server, pk: int) -> None:
    page.click("text=Delete…")
    page.click("button.danger")
    page.wait_for_url(f"{live_server.url}/", timeout=60_000)
    assert not Instance.objects.visible().filter(pk=pk).exists()


def test_a_redis_from_the_form_to_deletion(page, live_server):
    shoot(page, "dashboard-empty")
    pk = create_through_the_form(page, live_server, "redis", {"#id_maxmemory": "128mb", "#id_appendfsync": "always"})
    wait_running_without_reload(page)
    page.click("[data-reveal]")
    host, port, password = (page.inner_text(f"#{field}") for field in ("host", "port", "password"))
    client = redis.Redis(host=host, port=int(port), password=password)
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    client.close()
    shoot(page, "instance-redis-desktop")
    page.set_viewport_size({"width": 375, "height": 800})
    shoot(page, "instance-redis-375")
    page.goto(f"{live_server.url}/")
    shoot(page, "dashboard-375")
    page.set_viewport_size({"width": 1280, "height": 900})
    shoot(page, "dashboard")
    page.goto(f"{live_server.url}/instances/{pk}/")
    delete_through_the_page(page, live_server, pk)


def test_a_latin1_mysql_from_the_form_to_deletion(page, live_server):
    pk = create_through_the_form(page, live_server, "mysql", {"#id_charset": "latin1", "#id_binlog_format": "MIXED"})
    wait_running_without_reload(page)
    page.click("[data-reveal]")
    fields = {field: page.inner_text(f"#{field}") for field in ("host", "port", "database", "username", "password")}
    db = pymysql.connect(
        host=fields["host"],
        port=int(fields["port"]),
        user=fields["username"],
        password=fields["password"],
        database=fields["database"],
    )
    with db.cursor() as cursor:
        cursor.execute("SELECT @@character_set_server, @@binlog_format")
        assert cursor.fetchone() == ("latin1", "MIXED")
    db.close()
    shoot(page, "instance-mysql-desktop")
    delete_through_the_page(page, live_server, pk)


def test_settings_edited_on_the_page_are_applied_live_or_at_the_restart(page, live_server):
    pk = create_through_the_form(page, live_server, "redis", {})
    wait_running_without_reload(page)
    page.click("[data-reveal]")
    client = redis.Redis(host=page.inner_text("#host"), port=int(page.inner_text("#port")),
                         password=page.inner_text("#password"))  # fmt: skip

    page.click("[data-action=settings]")
    shoot(page, "settings-redis")
    assert page.locator("#id_disk").is_disabled(), "a create-only option cannot be edited"
    assert "(live)" in page.inner_text("label[for=id_maxmemory]")
    page.fill("#id_maxmemory", "96mb")
    page.fill("#id_databases", "4")
    with page.expect_navigation(url=f"{live_server.url}/instances/{pk}/"):
        page.locator("#settings button[type=submit]").click()
    assert client.config_get("maxmemory") == {"maxmemory": str(96 * 1024 * 1024)}, "a live option applies at once"
    assert client.config_get("databases") == {"databases": "16"}
    assert "databases 16 → 4" in page.inner_text("#pending")
    shoot(page, "instance-pending")

    page.once("dialog", lambda dialog: dialog.accept())
    page.click("[data-action=restart-now]")
    page.wait_for_selector("#pending", state="detached", timeout=60_000)
    page.wait_for_selector("#status:text('running')", timeout=60_000)
    assert client.config_get("databases") == {"databases": "4"}
    client.close()
    delete_through_the_page(page, live_server, pk)


def test_a_form_error_is_shown_at_the_field(page, live_server):
    page.click("text=New Redis")
    page.fill("#id_maxclients", "0")
    page.click("main button[type=submit]")
    assert "1 to 10000" in page.inner_text("#maxclients-error")
    shoot(page, "create-error")


def test_the_browsable_apis_form_creates_an_instance_with_its_options(page, live_server, api):
    page.goto(f"{live_server.url}/api/storage/redis/instances")
    assert page.inner_text("h1") == "Redis instances"
    page.click("a[name=html-tab]")
    form = page.locator("#post-object-form")
    form.locator("input[name=name]").fill("from-the-api-form")
    form.locator("input[name=maxmemory]").fill("128mb")
    form.locator("select[name=maxmemory_policy]").select_option("allkeys-lru")
    shoot(page, "browsable-api-create")
    form.locator("button", has_text="POST").click()
    page.wait_for_selector("text=HTTP 202 Accepted")
    pk = Instance.objects.get(name="from-the-api-form").pk

    body = wait_for_status(api, "redis", pk, "running")
    assert body["options"]["maxmemory"] == 128 * 1024 * 1024
    assert body["options"]["maxmemory_policy"] == "allkeys-lru"
    assert body["options"]["maxclients"] == 1000  # left as the form offered it
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"])
    assert client.config_get("maxmemory") == {"maxmemory": str(128 * 1024 * 1024)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
    client.close()
    assert api.delete(f"/api/storage/redis/instances/{pk}").status_code == 202
    wait_for_status(api, "redis", pk, "gone")
