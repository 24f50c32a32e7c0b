"""The warm pool's decisions and `?wait=`, over the fake backend: which creates may take a pool
server, which servers may be handed out, and how waits are bounded. test_pool.py proves the pool
against real servers."""

from datetime import timedelta

import pytest
from django.db.models import F

from provisioning import health, services
from provisioning.backends.base import BackendError
from provisioning.engines import get_engine
from provisioning.models import Instance, Snapshot
from provisioning.services import pool

from .conftest import reconcile


@pytest.mark.parametrize("wait", ["soon", "-1", "61", "nan", "inf", ""])
def test_a_wait_that_is_not_seconds_within_the_limit_is_a_400_and_nothing_is_made(api, wait):
    response = api.post(f"/api/storage/redis/instances?wait={wait}", {}, format="json")

    assert response.status_code == 400, response.content
    assert "wait" in response.json()
    assert not Instance.objects.exists()


def test_a_wait_beyond_the_waiting_requests_allowed_answers_202_at_once(api, settings, monkeypatch):
    settings.STOCKROOM_WAITING_REQUESTS = 0

    def no_sleep(seconds: float) -> None:
        raise AssertionError("a request beyond STOCKROOM_WAITING_REQUESTS must not wait")

    monkeypatch.setattr("provisioning.services.requests.time.sleep", no_sleep)

    response = api.post("/api/storage/redis/instances?wait=30", {}, format="json")  # no worker runs it

    assert response.status_code == 202, response.content
    assert response.json()["status"] == "provisioning" and "config" not in response.json()


def test_only_options_that_change_live_may_take_a_pool_server():
    redis = get_engine("redis")

    assert pool.differences(redis, redis.clean_options({})) == {}
    assert pool.differences(redis, redis.clean_options({"maxmemory": "128mb"})) == {"maxmemory": 128 * 1024**2}
    assert pool.differences(redis, redis.clean_options({"databases": 4})) is None  # a restart
    mysql = get_engine("mysql")
    assert pool.differences(mysql, mysql.clean_options({"charset": "latin1"})) is None  # create-only
    assert pool.differences(mysql, mysql.clean_options({"max_connections": 40})) == {"max_connections": 40}


def pool_server(alice, *, port: int, **fields) -> Instance:
    defaults = {"options": get_engine("redis").clean_options({}), "status": "running", "pool": True}
    return Instance.objects.create(
        owner=alice, kind="redis", name=f"pool-{port}", backend="fake", host="127.0.0.1", port=port,
        username="default", password="p", admin_password="a", **(defaults | fields),
    )  # fmt: skip


def test_a_pool_server_whose_options_were_changed_or_is_held_is_never_handed_out(alice):
    pool_server(alice, port=40001, options=get_engine("redis").clean_options({"maxmemory": "128mb"}))
    pool_server(alice, port=40002, pending_options={"databases": 4})
    pool_server(alice, port=40003, status="provisioning")
    pool_server(alice, port=40004, pool=False)

    assert pool.candidate("redis", "fake") is None

    good = pool_server(alice, port=40005)
    assert pool.candidate("redis", "fake") == good.pk


def test_a_pool_server_is_taken_once(alice, django_user_model):
    server = pool_server(alice, port=40010)
    bob = django_user_model.objects.create_user("bob")

    first = pool.take(server.pk, owner=alice, name="mine")
    second = pool.take(server.pk, owner=bob, name="also-mine")

    assert first is not None and first.owner == alice and not first.pool and first.status == "provisioning"
    assert first.password != "p", "the pool's own password must not be the tenant's"
    assert second is None


def test_nobody_signs_in_as_the_pool_and_a_user_of_its_name_gets_no_pool(client, django_user_model, settings):
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    services.fill_pool()
    user = django_user_model.objects.get(username=pool.USERNAME)
    assert not user.is_active and not user.has_usable_password()
    assert Instance.objects.filter(pool=True, owner=user).count() == 1
    # Its password is unusable: no guess signs in, on the page or for an API token.
    for guess in ("", "stockroom-pool", "password"):
        client.post("/accounts/login/", {"username": pool.USERNAME, "password": guess})
        assert "_auth_user_id" not in client.session
        response = client.post("/api/auth/token", {"username": pool.USERNAME, "password": guess})
        assert response.status_code == 400, response.content

    # A user who may sign in under that name would see the pool's servers as theirs: no pool then.
    Instance.objects.filter(pool=True).delete()
    user.is_active = True
    user.set_password("taken-name-password-1")
    user.save()

    assert services.fill_pool() == {}
    assert not Instance.objects.filter(pool=True).exists()


def test_a_hand_over_that_fails_while_the_broker_is_down_fails_the_create_saying_so(
    api, fake, settings, committed, monkeypatch
):
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [server] = Instance.objects.filter(pool=True, status="running")
    assert fake.server(server.pk) is not None
    fake.fail_next("set_password", BackendError("the server went away"))

    def broker_down(*args, **kwargs):
        raise ConnectionError("the broker is down")

    monkeypatch.setattr("provisioning.services.jobs.send", broker_down)

    response = api.post("/api/storage/redis/instances?wait=5", {}, format="json")

    assert response.status_code == 202, response.content
    body = response.json()
    assert body["id"] == server.pk and body["status"] == "failed"
    assert "could not be queued" in body["status_message"] and "Try again" in body["status_message"]
    assert Instance.objects.get(pk=server.pk).claimed_until is None
    assert fake.server(server.pk) is None, "the half-handed-over server was left running, its port given up"


def test_an_operator_cannot_change_a_pool_servers_options(admin_client, alice):
    """A changed pool server would be neither handed out nor replaced: the pool would stay short."""
    server = pool_server(pool.owner(), port=40030)
    page = admin_client.post(
        f"/admin/provisioning/instance/{server.pk}/settings/", {"name": server.name, "maxmemory": "128mb"}
    )
    assert page.status_code == 200 and "A warm-pool server runs its kind" in page.content.decode()
    server.refresh_from_db()
    assert server.options == get_engine("redis").clean_options({}) and server.pending_options == {}


def test_a_pooled_create_works_out_once_which_options_differ_and_sets_them(api, fake, settings, committed, monkeypatch):
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [server] = Instance.objects.filter(pool=True, status="running")
    asked = []
    differences = pool.differences
    monkeypatch.setattr(
        pool, "differences", lambda engine, options: asked.append(options) or differences(engine, options)
    )

    response = api.post("/api/storage/redis/instances?wait=5", {"maxmemory": "128mb"}, format="json")

    assert response.status_code == 201, response.content
    assert response.json()["id"] == server.pk and "pool" in response.json()["timings"]
    assert fake.server(server.pk).options["maxmemory"] == 128 * 1024**2
    assert len(asked) == 1, "the create and the hand-over must not each work them out"


def test_a_full_pool_costs_a_refill_one_read_and_no_lock(db, settings, committed, django_assert_num_queries):
    settings.STOCKROOM_POOL = {"mysql": 1, "redis": 1}
    with committed():
        services.fill_pool()
    assert Instance.objects.filter(pool=True, status="running").count() == 2

    with django_assert_num_queries(1):  # the reconciler refills every pass
        assert not any(services.fill_pool().values())


def test_a_stopped_pool_server_is_removed_and_replaced(db, settings, committed, fake):
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [server] = Instance.objects.filter(pool=True, status="running")
    with committed():  # an operator stops it, in the admin say: it is never started again nor handed out
        services.request_action(instance=server, action="stop", by="an operator")
    assert Instance.objects.get(pk=server.pk).status == "stopped"
    assert health.pool() == "Degraded: creates take the cold path until it is full: redis 0 of 1 ready."

    with committed():
        services.fill_pool()

    assert Instance.objects.get(pk=server.pk).status == "deleted" and fake.server(server.pk) is None
    [fresh] = Instance.objects.filter(pool=True, status="running")
    assert fresh.pk != server.pk
    assert health.pool() == "redis 1 of 1 ready."


def test_a_pool_server_gets_no_scheduled_backups(db, settings, committed):
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [server] = Instance.objects.filter(pool=True, status="running")
    Instance.objects.update(created_at=F("created_at") - timedelta(days=2))  # long past its first backup

    with committed():
        assert reconcile().backups_requested == 0

    assert not Snapshot.objects.filter(instance=server).exists(), "a pool server holds no data to keep"


def test_a_pool_server_being_deleted_does_not_count_so_no_running_one_goes_with_it(db, settings, committed, fake):
    """While a stopped or surplus server's deletion runs, the pool is at its size, not above it."""
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [running] = Instance.objects.filter(pool=True, status="running")
    pool_server(pool.owner(), port=40040, status="deleting")

    with committed():
        assert not any(services.fill_pool().values())

    assert Instance.objects.get(pk=running.pk).status == "running"


def test_a_hand_over_that_fails_makes_the_same_instance_from_nothing(api, fake, settings, committed):
    """The usual failure: the broker is up, the half-handed-over server is removed, and a worker
    makes the tenant's instance from nothing, with the tenant's options and password."""
    settings.STOCKROOM_POOL = {"mysql": 0, "redis": 1}
    with committed():
        services.fill_pool()
    [server] = Instance.objects.filter(pool=True, status="running")
    made_by_the_pool = fake.server(server.pk)
    fake.fail_next("set_password", BackendError("the server went away"))

    response = api.post("/api/storage/redis/instances?wait=5", {"maxmemory": "128mb"}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["id"] == server.pk and body["status"] == "running" and "pool" not in body["timings"]
    remade = fake.server(server.pk)
    assert remade is not None and remade is not made_by_the_pool
    assert remade.options["maxmemory"] == 128 * 1024**2
    assert remade.password == body["config"]["password"] != server.password
