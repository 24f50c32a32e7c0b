"""Engine versions and time zones against real servers: the version the portal records is the one a
client reads, an instance on older binaries is flagged until a restart, the restart runs
mariadb-upgrade, and named time zones work for the tenant. Docker variants at the end."""

import subprocess
import time

import pymysql
import pytest

from provisioning.backends.base import get_backend
from provisioning.models import Instance
from provisioning.services.versions import UPGRADED

from .conftest import server_dir, wait_for_status
from .test_docker_backend import container_of, docker_settings  # noqa: F401 - a fixture
from .test_lifecycle import act, mysql, running
from .test_snapshots import execute, redis_client, rows

pytestmark = pytest.mark.django_db(transaction=True)

OLD = "10.6.16-MariaDB-old"  # a version no host runs: the instance looks as if it were made before an upgrade


def scalar(config: dict, sql: str):
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


def flagged(api, kind: str, pk: int) -> bool:
    return api.get(f"/api/storage/{kind}/instances/{pk}").json()["upgrade_available"]


def upgrades(pk: int) -> list[str]:
    return list(Instance.objects.get(pk=pk).events.filter(type=UPGRADED).values_list("reason", flat=True))


def test_a_mysql_instance_records_the_version_its_client_reads(api):
    pk, config = running(api, "mysql")
    instance = api.get(f"/api/storage/mysql/instances/{pk}").json()
    # The server adds "-log" while its binary log is on (always, here): a setting, not a version.
    assert scalar(config, "SELECT VERSION()").removesuffix("-log") == instance["server_version"]
    assert instance["server_version"].startswith("10.11.")
    assert instance["server_version"] == get_backend("local").host_version("mysql")
    assert instance["upgrade_available"] is False


def test_a_redis_instance_records_the_version_its_client_reads(api):
    pk, config = running(api, "redis")
    instance = api.get(f"/api/storage/redis/instances/{pk}").json()
    assert redis_client(config).info("server")["redis_version"] == instance["server_version"]
    found = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    assert f"v={instance['server_version']} " in found
    assert instance["upgrade_available"] is False


def test_a_mysql_instance_on_old_binaries_is_flagged_and_a_restart_upgrades_it(api):
    pk, config = running(api, "mysql")
    execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'kept')")
    current = Instance.objects.get(pk=pk).server_version
    # As if the host's packages had moved on since the server started: its data's mark of the version
    # mariadb-upgrade last brought it to is older too (of another major version: mariadb-upgrade
    # leaves data of the same major version, 10.11.x, as it is).
    Instance.objects.filter(pk=pk).update(server_version=OLD)
    mark = server_dir("mysql", pk) / "data" / "mysql_upgrade_info"
    mark.write_text("10.6.16-MariaDB")
    assert flagged(api, "mysql", pk) is True
    page = api.get(f"/api/storage/mysql/instances/{pk}").json()
    assert page["server_version"] == OLD

    after = act(api, "mysql", pk, "restart", "running", "unhealthy")

    assert after["status"] == "running", after["status_message"]
    assert after["server_version"] == current and after["upgrade_available"] is False
    assert mark.read_text().strip("\0\n") == current.split("-")[0] + "-MariaDB", "mariadb-upgrade ran to the end"
    [event] = upgrades(pk)
    assert event.startswith(f"Upgraded from {OLD} to {current}: mariadb-upgrade")
    assert rows(config) == [[1, "kept"]]

    act(api, "mysql", pk, "restart", "running")
    assert upgrades(pk) == [event], "a restart on the same binaries upgrades nothing"


def test_a_redis_instance_on_old_binaries_is_flagged_until_a_restart(api):
    pk, config = running(api, "redis")
    current = Instance.objects.get(pk=pk).server_version
    Instance.objects.filter(pk=pk).update(server_version="6.0.0")
    assert flagged(api, "redis", pk) is True
    after = act(api, "redis", pk, "restart", "running")
    assert after["server_version"] == current and after["upgrade_available"] is False
    assert upgrades(pk) == [], "Redis converts its own data as it starts"


def test_named_time_zones_work_for_the_tenant(api):
    pk, config = running(api, "mysql")
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SET time_zone = 'Europe/Paris'")
        cursor.execute("SELECT @@session.time_zone, CONVERT_TZ('2026-07-01 12:00:00', 'UTC', 'Europe/Paris')")
        zone, paris = cursor.fetchone()
        cursor.execute("SELECT CONVERT_TZ('2026-01-15 12:00:00', 'America/New_York', 'Asia/Tokyo')")
        tokyo = cursor.fetchone()[0]
    assert zone == "Europe/Paris"
    assert str(paris) == "2026-07-01 14:00:00"  # summer time: UTC+2
    assert str(tokyo) == "2026-01-16 02:00:00"
    with mysql(config) as db, db.cursor() as cursor, pytest.raises(pymysql.err.DatabaseError, match="Unknown"):
        cursor.execute("SET time_zone = 'Mars/Olympus_Mons'")
    # The tables take about 8 MB of the instance's disk; Aria's log of loading them is not kept.
    aria = sum(path.stat().st_size for path in (server_dir("mysql", pk) / "data").glob("aria_log.*"))
    assert aria < 9 * 1024 * 1024


def test_the_time_zone_option_takes_a_named_zone_at_create_and_live(api):
    pk, config = running(api, "mysql", {"time_zone": "Europe/Paris"})
    assert scalar(config, "SELECT @@GLOBAL.time_zone") == scalar(config, "SELECT @@SESSION.time_zone") == "Europe/Paris"
    assert str(scalar(config, "SELECT CONVERT_TZ('2026-01-15 12:00:00', '+00:00', @@SESSION.time_zone)")) == (
        "2026-01-15 13:00:00"
    )
    response = api.patch(f"/api/storage/mysql/instances/{pk}", {"options": {"time_zone": "Asia/Tokyo"}}, format="json")
    assert response.status_code == 202, response.content
    assert scalar(config, "SELECT @@SESSION.time_zone") == "Asia/Tokyo"


# Docker --------------------------------------------------------------------------------


def test_a_mysql_container_records_its_version_and_knows_named_time_zones(api, docker_settings):  # noqa: F811
    backend = docker_settings()
    started = time.monotonic()
    pk = api.post("/api/storage/mysql/instances", {}).json()["id"]
    instance = wait_for_status(api, "mysql", pk, "running", "failed", timeout=120)
    took = time.monotonic() - started
    assert instance["status"] == "running", instance["status_message"]
    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    assert scalar(config, "SELECT VERSION()").removesuffix("-log") == instance["server_version"]
    assert backend.host_version("mysql") == instance["server_version"], "the image's mariadbd --version"
    assert instance["upgrade_available"] is False
    with mysql(config) as db, db.cursor() as cursor:
        cursor.execute("SET time_zone = 'Europe/Paris'")
        cursor.execute("SELECT CONVERT_TZ('2026-07-01 12:00:00', 'UTC', @@session.time_zone)")
        assert str(cursor.fetchone()[0]) == "2026-07-01 14:00:00"
    print(f"Docker MySQL create with the time zone tables: {took:.1f} s")
    aria = sum(
        path.stat().st_size
        for path in (backend.directory(Instance.objects.get(pk=pk)) / "disk" / "data").glob("aria_log.*")
    )
    assert aria < 9 * 1024 * 1024, "Aria's log does not keep the time zone rows (aria_log_file_size)"


def test_a_mysql_container_on_old_binaries_is_flagged_and_a_restart_upgrades_it(api, docker_settings):  # noqa: F811
    backend = docker_settings()
    pk, config = running(api, "mysql")
    current = Instance.objects.get(pk=pk).server_version
    Instance.objects.filter(pk=pk).update(server_version=OLD)
    mark = backend.directory(Instance.objects.get(pk=pk)) / "disk" / "data" / "mysql_upgrade_info"
    mark.write_text("10.6.16-MariaDB")
    assert flagged(api, "mysql", pk) is True

    after = act(api, "mysql", pk, "restart", "running", "unhealthy")

    assert after["status"] == "running", after["status_message"]
    assert after["server_version"] == current and after["upgrade_available"] is False
    assert mark.read_text().strip("\0\n") == current.split("-")[0] + "-MariaDB", "mariadb-upgrade ran in the container"
    [event] = upgrades(pk)
    assert event.startswith(f"Upgraded from {OLD} to {current}: mariadb-upgrade")


def test_a_restart_makes_the_container_again_when_its_image_name_moved(api, docker_settings, tmp_path):  # noqa: F811
    # A tag of the test image; then the tag moves to a new image (the same files, one more label),
    # as `docker pull` moves it to a new release.
    backend = docker_settings()
    image = backend.images["mysql"]
    tag = f"stockroom/versions-test:t{time.time_ns()}"
    client = backend.client
    client.images.get(image).tag(tag)
    try:
        backend = docker_settings(images={"mysql": tag, "redis": tag})
        pk, config = running(api, "mysql")
        execute(config, "CREATE TABLE t (id INT PRIMARY KEY, note TEXT)", "INSERT INTO t VALUES (1, 'kept')")
        old = container_of(backend, pk)
        (tmp_path / "Dockerfile").write_text(f"FROM {tag}\nLABEL io.stockroom.test=moved\n")
        new_image, _ = client.images.build(path=str(tmp_path), tag=tag, rm=True)
        assert old.attrs["Image"] != new_image.id

        after = act(api, "mysql", pk, "restart", "running", "unhealthy")

        assert after["status"] == "running", after["status_message"]
        container = container_of(backend, pk)
        assert container.attrs["Image"] == new_image.id and container.id != old.id
        assert container.name == f"stockroom-mysql-{pk}"
        assert len(backend._own(Instance.objects.get(pk=pk))) == 1, "the old container is gone"
        assert rows(config) == [[1, "kept"]], "the same data, mounted again"
        act(api, "mysql", pk, "restart", "running")
        assert container_of(backend, pk).id == container.id, "made again only when the image moved"
    finally:
        for instance in Instance.objects.filter(backend="docker"):
            backend.destroy(instance)
        try:
            client.images.remove(tag, force=True)
        except Exception:  # noqa: BLE001 - best effort
            pass
