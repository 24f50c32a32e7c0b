"""MySQL end to end on the local backend: API → real mariadbd → real logins → delete."""

import pymysql
import pytest

from .conftest import instance_dir, port_refuses, server_dir, wait_for_status

pytestmark = pytest.mark.django_db(transaction=True)


def connect(config: dict, **overrides) -> pymysql.Connection:
    arguments = {
        "host": config["host"],
        "port": config["port"],
        "user": config["username"],
        "password": config["password"],
        "database": config["database"],
    }
    return pymysql.connect(**(arguments | overrides))


def scalar(connection: pymysql.Connection, sql: str):
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def test_a_mysql_instance_from_request_to_deletion(api):
    response = api.post(
        "/api/storage/mysql/instances", {"name": "orders", "charset": "latin1", "binlog_format": "STATEMENT"}
    )
    assert response.status_code == 202
    pk = response.json()["id"]
    instance = wait_for_status(api, "mysql", pk, "running", "failed")
    assert instance["status"] == "running", instance["status_message"]
    # Where the time went, for `make bench`: every step was measured.
    assert set(instance["timings"]) == {"queued", "data_directory", "server_start", "first_login"}

    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    with connect(config) as db:
        assert scalar(db, "SELECT @@character_set_server") == "latin1"
        assert scalar(db, "SELECT @@collation_server") == "latin1_swedish_ci"
        assert scalar(db, "SELECT @@binlog_format") == "STATEMENT"
        assert scalar(db, "SELECT @@log_bin") == 1
        assert scalar(db, "SELECT @@character_set_database") == "latin1"
        with db.cursor() as cursor:
            cursor.execute("CREATE TABLE orders (id INT PRIMARY KEY, note VARCHAR(20)) ENGINE=InnoDB")
            cursor.execute("INSERT INTO orders VALUES (1, 'first')")
        db.commit()
        assert scalar(db, "SELECT note FROM orders WHERE id = 1") == "first"

    response = api.delete(f"/api/storage/mysql/instances/{pk}")
    assert response.status_code == 202
    assert response.json()["status"] == "deleting"
    wait_for_status(api, "mysql", pk, "gone")
    assert port_refuses(config["port"])
    assert not instance_dir("mysql", pk).exists()


def test_the_user_can_touch_only_its_own_database(api):
    pk = api.post("/api/storage/mysql/instances", {}).json()["id"]
    assert wait_for_status(api, "mysql", pk, "running", "failed")["status"] == "running"
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()

    from provisioning.models import Instance

    instance = Instance.objects.get(pk=pk)
    admin = pymysql.connect(
        unix_socket=str(server_dir("mysql", pk) / "server.sock"), user="root", password=instance.admin_password
    )
    with admin.cursor() as cursor:
        cursor.execute("SELECT CONCAT(User, '@', Host) FROM mysql.user ORDER BY 1")
        assert [row[0] for row in cursor.fetchall()] == ["app@%", "mariadb.sys@localhost", "root@localhost"]
        cursor.execute("SELECT @@secure_file_priv")
        assert cursor.fetchone()[0] == str(server_dir("mysql", pk) / "files") + "/"
        cursor.execute("SELECT @@tmpdir")  # its own, not a /tmp shared with every other server
        assert cursor.fetchone()[0] == str(server_dir("mysql", pk) / "tmp")
        cursor.execute("CREATE DATABASE other")
        cursor.execute("CREATE TABLE other.secrets (v INT)")
    admin.close()

    with connect(config) as db:
        assert scalar(db, "SELECT CURRENT_USER()") == "app@%"
        for statement in (
            "SELECT * FROM other.secrets",
            "SELECT * FROM mysql.user",
            "CREATE DATABASE mine",
            "CREATE USER 'eve'@'%'",
            "SHUTDOWN",
        ):
            with pytest.raises(pymysql.err.OperationalError) as denied, db.cursor() as cursor:
                cursor.execute(statement)
            assert denied.value.args[0] in (1044, 1045, 1142, 1227), statement
        assert scalar(db, "SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = 'other'") == 0

    for password in ("", config["password"], instance.admin_password):
        with pytest.raises(pymysql.err.OperationalError):  # root only through the Unix socket
            connect(config, user="root", password=password, database=None)
    with pytest.raises(pymysql.err.OperationalError):
        connect(config, user="", password="", database=None)
    with pytest.raises(pymysql.err.OperationalError):
        connect(config, password="wrong-password")

    assert api.delete(f"/api/storage/mysql/instances/{pk}").status_code == 202
    wait_for_status(api, "mysql", pk, "gone")


def test_utf8mb4_is_the_default(api):
    pk = api.post("/api/storage/mysql/instances", {"collation": "utf8mb4_bin"}).json()["id"]
    assert wait_for_status(api, "mysql", pk, "running", "failed")["status"] == "running"
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    with connect(config) as db:
        assert scalar(db, "SELECT @@character_set_server") == "utf8mb4"
        assert scalar(db, "SELECT @@collation_server") == "utf8mb4_bin"
        assert scalar(db, "SELECT @@binlog_format") == "ROW"
        assert scalar(db, "SELECT @@performance_schema") == 0
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone")


def test_a_temporary_table_much_bigger_than_arias_cache_works(api):
    """my.cnf gives Aria a 1 MB cache (to save memory): a query whose temporary table goes to disk
    (a TEXT column in GROUP BY) and is several MB still answers, and right."""
    pk = api.post("/api/storage/mysql/instances", {}).json()["id"]
    assert wait_for_status(api, "mysql", pk, "running", "failed")["status"] == "running"
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    with connect(config) as db:
        assert scalar(db, "SELECT @@aria_pagecache_buffer_size") == 1024 * 1024
        with db.cursor() as cursor:
            cursor.execute("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT) ENGINE=InnoDB")
            rows = [(n, f"{n:08d}" * 100) for n in range(20000)]  # 800 characters each: 16 MB
            cursor.executemany("INSERT INTO notes VALUES (%s, %s)", rows)
        db.commit()
        with db.cursor() as cursor:
            cursor.execute("SHOW SESSION STATUS LIKE 'Created_tmp_disk_tables'")
            before = int(cursor.fetchone()[1])
            cursor.execute("SELECT body, COUNT(*) FROM notes GROUP BY body ORDER BY body DESC LIMIT 2")
            assert cursor.fetchall() == ((f"{19999:08d}" * 100, 1), (f"{19998:08d}" * 100, 1))
            cursor.execute("SHOW SESSION STATUS LIKE 'Created_tmp_disk_tables'")
            assert int(cursor.fetchone()[1]) > before  # it did go to disk, through Aria's cache
    api.delete(f"/api/storage/mysql/instances/{pk}")
    wait_for_status(api, "mysql", pk, "gone")
