"""A tenant stays inside its own instance: the attacks of issue 11 that the engines stop, replayed
against real servers the way a tenant who owns one instance would try them."""

import json

import pymysql
import pytest
import redis
from django.conf import settings
from django.core.cache.backends.redis import RedisCache
from kombu import Connection

from provisioning.backends.local import processes_under
from provisioning.engines.redis import ADMIN_USERNAME, NO_RETRY
from provisioning.models import Instance

from .conftest import broker_port, instance_dir, server_dir, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)

MiB = 1024 * 1024


def running(api, kind: str) -> tuple[int, dict]:
    pk = api.post(f"/api/storage/{kind}/instances", {}).json()["id"]
    body = wait_for_status(api, kind, pk, "running", "failed")
    assert body["status"] == "running", body["status_message"]
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def rotate(api, kind: str, pk: int) -> dict:
    assert api.post(f"/api/storage/{kind}/instances/{pk}/rotate-password").status_code == 202
    assert wait_for_status(api, kind, pk, "running", "unhealthy")["status"] == "running"
    return api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def delete(api, kind: str, pk: int) -> None:
    assert api.delete(f"/api/storage/{kind}/instances/{pk}").status_code == 202
    wait_for_status(api, kind, pk, "gone")


def peak_memory(kind: str, pk: int) -> int:
    """The most resident memory the instance's server has used, in bytes."""
    (pid,) = processes_under(instance_dir(kind, pk))
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


# Redis ---------------------------------------------------------------------------------


def tenant_redis(config: dict, **overrides) -> redis.Redis:
    """What an application does: the URI from /config, in redis-py (which sends CLIENT SETINFO)."""
    return redis.Redis.from_url(config["uri"], retry=NO_RETRY, **overrides)


def admin_redis(pk: int, config: dict) -> redis.Redis:
    instance = Instance.objects.get(pk=pk)
    return redis.Redis(port=config["port"], username=ADMIN_USERNAME, password=instance.admin_password, retry=NO_RETRY)


# (command, why a tenant must not have it)
DENIED_REDIS = [
    (("MIGRATE", "127.0.0.1", "6379", "k", "0", "1000"), "connects to another server"),
    (("RESTORE", "r", "0", b"\x00\x01"), "loads a raw payload"),
    (("RESTORE-ASKING", "r", "0", b"\x00\x01"), "loads a raw payload"),
    (("FUNCTION", "RESTORE", b"\x00\x01"), "loads a raw payload"),
    (("DEBUG", "SLEEP", "0"), "debugging"),
    (("MODULE", "LOAD", "/tmp/evil.so"), "loads code"),
    (("SYNC",), "replication"),
    (("PSYNC", "?", "-1"), "replication"),
    (("REPLCONF", "listening-port", "1"), "replication"),
    (("REPLICAOF", "127.0.0.1", "6379"), "replication"),
    (("SLAVEOF", "127.0.0.1", "6379"), "replication"),
    (("MONITOR",), "sees every client's commands"),
    (("CONFIG", "SET", "maxmemory", "0"), "administration"),
    (("CONFIG", "SET", "dir", "/tmp"), "administration"),
    (("CONFIG", "REWRITE"), "administration"),
    (("ACL", "SETUSER", "eve", "on", ">pw", "+@all"), "administration"),
    (("ACL", "LOAD"), "administration"),
    (("ACL", "LIST"), "administration"),
    (("CLIENT", "LIST"), "administration"),
    (("CLIENT", "KILL", "USER", ADMIN_USERNAME), "administration"),
    (("SHUTDOWN", "NOSAVE"), "administration"),
    (("SAVE",), "administration"),
    (("BGSAVE",), "administration"),
    (("BGREWRITEAOF",), "administration"),
]


def test_a_redis_tenant_runs_celery_and_cache_workloads(api):
    pk, config = running(api, "redis")
    client = tenant_redis(config)

    # Celery's broker and result backend, command by command.
    client.lpush("celery", "task-1")
    assert client.brpop(["celery"], timeout=1) == (b"celery", b"task-1")
    with client.pipeline(transaction=True) as pipe:  # MULTI … EXEC
        pipe.zadd("unacked_index", {"tag": 1.0}).hset("unacked", "tag", "body").execute()
    assert client.hget("unacked", "tag") == b"body"
    subscriber = client.pubsub()
    subscriber.subscribe("celery-task-meta")
    assert subscriber.get_message(timeout=1)["type"] == "subscribe"
    assert client.publish("celery-task-meta", "done") == 1
    assert subscriber.get_message(timeout=1)["data"] == b"done"
    subscriber.close()
    assert client.eval("return redis.call('INCR', KEYS[1])", 1, "counter") == 1

    # Kombu itself, as a Celery worker uses it.
    with Connection(config["uri"]) as connection:
        queue = connection.SimpleQueue("tasks")
        queue.put({"task": "add", "args": [2, 3]})
        message = queue.get(timeout=2)
        assert message.payload == {"task": "add", "args": [2, 3]}
        message.ack()
        queue.close()

    # A cache, command by command and through Django's own Redis cache.
    assert client.set("page", "html", ex=60)
    assert client.get("page") == b"html"
    assert client.mget(["page", "missing"]) == [b"html", None]
    assert client.incr("hits") == 1 and client.expire("hits", 60)
    assert b"page" in list(client.scan_iter(match="pa*"))
    assert client.keys("pa*") == [b"page"]
    client.rpush("scores", 3, 1, 2)
    assert client.sort("scores") == [b"1", b"2", b"3"]
    assert client.info("memory")["maxmemory"] == config["maxmemory"]
    assert client.config_get("maxmemory") == {"maxmemory": str(config["maxmemory"])}
    assert isinstance(client.slowlog_get(), list)
    assert client.client_setname("web-1") and client.client_getname() == "web-1"
    assert client.client_id() > 0 and client.client_info()["name"] == "web-1"
    # CLIENT SETINFO (Redis 7.2) is allowed; Redis 7.0 does not know it, and says so.
    try:
        client.execute_command("CLIENT", "SETINFO", "LIB-NAME", "stockroom-test")
    except redis.ResponseError as exc:
        assert not isinstance(exc, redis.exceptions.NoPermissionError)
        assert "unknown subcommand" in str(exc).lower()
    cache = RedisCache(config["uri"], {})
    cache.set("fragment", {"a": 1}, timeout=60)
    assert cache.get("fragment") == {"a": 1}
    cache.set("views", 0)
    assert cache.incr("views") == 1
    cache.clear()  # FLUSHDB
    assert client.dbsize() == 0
    client.set("again", 1)
    assert client.flushall()
    assert client.dbsize() == 0

    client.close()
    delete(api, "redis", pk)


def test_a_redis_tenant_is_refused_what_reaches_outside_or_administers(api):
    pk, config = running(api, "redis")
    client = tenant_redis(config)
    admin = admin_redis(pk, config)
    for command, why in DENIED_REDIS:
        with pytest.raises(redis.ResponseError) as refused:
            client.execute_command(*command)
        if command[0] in ("DEBUG", "MODULE"):  # refused for everyone before the ACL is read
            assert "not allowed" in str(refused.value), command
        else:
            assert isinstance(refused.value, redis.exceptions.NoPermissionError), (command, why, refused.value)
        # Whatever else refuses it, the ACL does too.
        answer = admin.execute_command("ACL", "DRYRUN", "default", *command)
        assert answer != b"OK" and b"no permissions" in answer, (command, why, answer)
    assert client.ping()  # a refusal does not end the session

    # The portal's own user keeps what it needs to run the server.
    for command in (
        ("ACL", "LOAD"),
        ("CLIENT", "KILL", "USER", "default"),
        ("CONFIG", "SET", "maxmemory", "0"),
        ("SHUTDOWN",),
        ("BGREWRITEAOF",),
    ):
        assert admin.execute_command("ACL", "DRYRUN", ADMIN_USERNAME, *command) == b"OK", command
    assert admin.config_get("sanitize-dump-payload") == {"sanitize-dump-payload": "yes"}
    admin.close()
    client.close()
    delete(api, "redis", pk)


def test_a_redis_tenant_cannot_migrate_a_crafted_task_into_the_broker(api, broker):
    """Issue 11, attack 1: MIGRATE from the tenant's own Redis into the portal's Celery broker."""
    pk, config = running(api, "redis")
    port = str(broker_port())
    client = tenant_redis(config)
    crafted = json.dumps({"headers": {"task": "provisioning.tasks.delete_instance"}, "body": "…"})
    client.lpush("celery", crafted)

    for attempt in (
        ("MIGRATE", "127.0.0.1", port, "celery", "0", "5000"),
        ("MIGRATE", "127.0.0.1", port, "celery", "0", "5000", "COPY", "REPLACE"),
        ("MIGRATE", "127.0.0.1", port, "", "0", "5000", "KEYS", "celery"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*attempt)
    # Neither from inside a script nor queued in a transaction.
    with pytest.raises(redis.ResponseError, match="can.t run this command"):
        client.eval("return redis.call('MIGRATE', ARGV[1], ARGV[2], 'celery', 0, 5000)", 0, "127.0.0.1", port)
    with pytest.raises(redis.ResponseError), client.pipeline(transaction=True) as pipe:
        pipe.execute_command("MIGRATE", "127.0.0.1", port, "celery", "0", "5000").execute()
    # Nor by dumping the key and restoring a payload.
    payload = client.dump("celery")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.restore("copy", 0, payload)

    target = redis.Redis(port=int(port), password=settings.CELERY_BROKER_PASSWORD, retry=NO_RETRY)
    assert target.dbsize() == 0, "something arrived in the broker"
    target.close()
    assert client.lrange("celery", 0, -1) == [crafted.encode()]  # still the tenant's own
    client.close()
    delete(api, "redis", pk)


def test_a_redis_rotation_ends_the_sessions_opened_with_the_old_password(api):
    pk, config = running(api, "redis")
    old = tenant_redis(config, single_connection_client=True)
    old.set("kept", "before the rotation")
    listener = tenant_redis(config).pubsub()
    listener.subscribe("news")
    assert listener.get_message(timeout=1)["type"] == "subscribe"

    new = rotate(api, "redis", pk)
    assert new["password"] != config["password"]
    with pytest.raises(redis.ConnectionError):
        old.get("kept")
    with pytest.raises(redis.ConnectionError):
        listener.get_message(timeout=1)
    with pytest.raises(redis.AuthenticationError):
        tenant_redis(config).ping()
    fresh = tenant_redis(new)
    assert fresh.get("kept") == b"before the rotation"
    fresh.close()
    old.close()
    listener.close()
    delete(api, "redis", pk)


# MySQL (MariaDB) -----------------------------------------------------------------------


def tenant_mysql(config: dict, **overrides) -> pymysql.Connection:
    arguments = {
        "host": config["host"],
        "port": config["port"],
        "user": config["username"],
        "password": config["password"],
        "database": config["database"],
    }
    return pymysql.connect(**(arguments | overrides))


def query(db: pymysql.Connection, sql: str, args=None) -> tuple:
    with db.cursor() as cursor:
        cursor.execute(sql, args)
        return cursor.fetchall()


def error_code(db: pymysql.Connection, sql: str) -> int:
    with pytest.raises(pymysql.MySQLError) as refused:
        query(db, sql)
    return refused.value.args[0]


def test_a_mysql_tenant_cannot_grow_the_server_from_one_session(api):
    """Issue 11, attack 4: `SET SESSION max_heap_table_size=1G` and a MEMORY table took mariadbd
    from 55 MB to 1.1 GB."""
    pk, config = running(api, "mysql")
    with tenant_mysql(config) as db:
        for variable, cap in (
            ("max_heap_table_size", 16 * MiB),
            ("tmp_table_size", 16 * MiB),
            ("max_session_mem_used", 128 * MiB),
            ("sort_buffer_size", 16 * MiB),
            ("join_buffer_size", 16 * MiB),
        ):
            query(db, f"SET SESSION {variable} = 1024 * 1024 * 1024")
            assert query(db, f"SELECT @@session.{variable}") == ((cap,),), variable

        query(db, "CREATE TABLE hog (id INT AUTO_INCREMENT PRIMARY KEY, v VARCHAR(1000)) ENGINE=MEMORY")
        with pytest.raises(pymysql.MySQLError) as full:  # 1 GiB of rows
            query(db, "INSERT INTO hog (v) SELECT REPEAT('x', 1000) FROM seq_1_to_1100000")
        assert full.value.args[0] == 1114, full.value  # ER_RECORD_FILE_FULL: "The table 'hog' is full"
        (rows,) = query(db, "SELECT COUNT(*) FROM hog")[0]
        assert 0 < rows * 1000 <= 16 * MiB  # rows of 1,000 characters up to the cap, then no more
        # One statement that needs far more memory: a 3-million-value IN list (700 MB without the cap).
        huge = "SELECT 1 IN (" + ",".join(["7"] * 3_000_000) + ")"
        assert error_code(db, huge) == 1290  # ER_OPTION_PREVENTS_STATEMENT: --max-session-mem-used
        assert query(db, "SELECT 1") == ((1,),)  # the session goes on
    assert peak_memory("mysql", pk) < 256 * MiB
    delete(api, "mysql", pk)


def test_a_mysql_tenant_has_no_server_wide_rights(api):
    pk, config = running(api, "mysql")
    files = server_dir("mysql", pk) / "files"
    portal = pymysql.connect(
        unix_socket=str(server_dir("mysql", pk) / "server.sock"),
        user="root",
        password=Instance.objects.get(pk=pk).admin_password,
    )
    with tenant_mysql(config) as db:
        assert error_code(db, f"KILL CONNECTION {portal.thread_id()}") == 1095  # ER_KILL_DENIED_ERROR
        grants = " ".join(row[0] for row in query(db, "SHOW GRANTS"))
        assert "FILE" not in grants and "SUPER" not in grants and "ON *.* TO" in grants
        for statement in (
            "SET GLOBAL max_heap_table_size = 1073741824",
            "SET GLOBAL max_session_mem_used = 1073741824",
            "SET GLOBAL read_only = 1",
            "SET SESSION sql_log_bin = 0",
            "SHUTDOWN",
        ):
            assert error_code(db, statement) == 1227, statement  # ER_SPECIFIC_ACCESS_DENIED_ERROR
        assert [row[0] for row in query(db, "SHOW DATABASES")] == ["app", "information_schema"]
        assert error_code(db, "SELECT * FROM mysql.user") == 1142  # ER_TABLEACCESS_DENIED_ERROR
        query(db, "CREATE TABLE t (v TEXT)")
        # No FILE privilege: neither the host's files nor the instance's own files folder.
        assert error_code(db, "LOAD DATA INFILE '/etc/passwd' INTO TABLE t") == 1045
        assert error_code(db, f"LOAD DATA INFILE '{files}/x' INTO TABLE t") == 1045
        assert query(db, "SELECT LOAD_FILE('/etc/passwd')") == ((None,),)
        assert error_code(db, f"SELECT 1 INTO OUTFILE '{files}/out'") == 1227
        assert error_code(db, "SELECT 1 INTO OUTFILE '/tmp/stockroom-tenant-out'") == 1227
    assert not any(files.iterdir())
    assert query(portal, "SELECT 1") == ((1,),)
    portal.close()
    delete(api, "mysql", pk)


def test_a_mysql_rotation_ends_the_sessions_opened_with_the_old_password(api):
    pk, config = running(api, "mysql")
    old = tenant_mysql(config)
    query(old, "CREATE TABLE notes (v VARCHAR(40))")
    query(old, "INSERT INTO notes VALUES ('before the rotation')")
    old.commit()

    new = rotate(api, "mysql", pk)
    assert new["password"] != config["password"]
    with pytest.raises(pymysql.err.OperationalError) as ended:
        query(old, "SELECT v FROM notes")
    assert ended.value.args[0] in (2006, 2013), ended.value  # server gone / lost connection
    with pytest.raises(pymysql.err.OperationalError):
        tenant_mysql(config)
    with tenant_mysql(new) as fresh:
        assert query(fresh, "SELECT v FROM notes") == (("before the rotation",),)
    delete(api, "mysql", pk)
