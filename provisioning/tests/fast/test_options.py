import pytest

from provisioning.engines import OptionErrors, get_engine
from provisioning.options import parse_size


@pytest.mark.parametrize(
    ("given", "expected"),
    [(1048576, 1048576), ("256mb", 256 * 1024**2), ("1GB", 1024**3), ("100k", 100_000), ("42", 42)],
)
def test_sizes_follow_redis_units(given, expected):
    assert parse_size(given) == expected


def test_mysql_defaults():
    assert get_engine("mysql").clean_options({}) == {
        "charset": "utf8mb4",
        "collation": "utf8mb4_general_ci",
        "binlog_format": "ROW",
        "innodb_buffer_pool_size": 16 * 1024**2,
        "max_connections": 100,
        "sql_mode": "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION",
        "time_zone": "SYSTEM",
        "wait_timeout": 28800,
        "slow_query_log": "OFF",
        "long_query_time": 10,
        "lower_case_table_names": 0,
        "disk": 1024**3,
        "backup_interval_hours": 24,
        "backup_retention": 7,
    }


def test_mysql_collation_follows_the_charset():
    assert get_engine("mysql").clean_options({"charset": "latin1"})["collation"] == "latin1_swedish_ci"


def test_it_rejects_a_collation_of_another_charset():
    with pytest.raises(OptionErrors) as caught:
        get_engine("mysql").clean_options({"charset": "latin1", "collation": "utf8mb4_bin"})
    assert "latin1_swedish_ci" in caught.value.errors["collation"]


def test_redis_defaults():
    assert get_engine("redis").clean_options({}) == {
        "maxmemory": 64 * 1024**2,
        "maxmemory_policy": "noeviction",
        "maxclients": 1000,
        "appendfsync": "everysec",
        "timeout": 0,
        "notify_keyspace_events": "",
        "maxmemory_samples": 5,
        "databases": 16,
        "disk": 1024**3,
        "backup_interval_hours": 24,
        "backup_retention": 7,
    }


def test_it_collects_every_error_at_once():
    with pytest.raises(OptionErrors) as caught:
        get_engine("redis").clean_options({"maxclients": 0, "appendfsync": "sometimes", "colour": "red"})
    assert set(caught.value.errors) == {"maxclients", "appendfsync", "colour"}


@pytest.mark.parametrize("kind", ["mysql", "redis"])
@pytest.mark.parametrize(("disk", "hint"), [("100gb", "to 64gb"), (1024, "to 64gb"), ("lots", "units: b, kb")])
def test_disk_has_a_minimum_and_a_maximum(kind, disk, hint):
    with pytest.raises(OptionErrors) as caught:
        get_engine(kind).clean_options({"disk": disk})
    assert hint in caught.value.errors["disk"]


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("mysql", {}),
        ("mysql", {"disk": "64gb"}),
        ("redis", {}),
        ("redis", {"maxmemory": "1mb"}),
        ("redis", {"maxmemory": "4gb", "disk": "8gb"}),
    ],
)
def test_a_reservation_is_never_above_the_limit(kind, options):
    engine = get_engine(kind)
    cleaned = engine.clean_options(options)
    assert 0 < engine.memory_reservation(cleaned) <= engine.memory_limit(cleaned)


def test_a_redis_reserves_its_maxmemory_and_the_server_itself():
    redis = get_engine("redis")
    small, big = (
        redis.memory_reservation(redis.clean_options({"maxmemory": size, "disk": "2gb"})) for size in ("64mb", "1gb")
    )
    assert small > 64 * 1024**2
    assert big - small == 1024**3 - 64 * 1024**2


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("SYSTEM", "SYSTEM"),
        ("system", "SYSTEM"),
        ("+2:00", "+02:00"),
        ("-12:59", "-12:59"),
        ("Europe/Paris", "Europe/Paris"),
    ],
)
def test_mysql_time_zones(given, expected):
    assert get_engine("mysql").clean_options({"time_zone": given})["time_zone"] == expected


@pytest.mark.parametrize("given", ["+13:01", "-13:00", "+02:60", "Mars/Olympus", "../etc/passwd", "Europe/Paris'; --"])
def test_it_rejects_what_is_not_a_time_zone(given):
    with pytest.raises(OptionErrors) as caught:
        get_engine("mysql").clean_options({"time_zone": given})
    assert "time_zone" in caught.value.errors


def test_sql_mode_is_a_set_of_single_modes():
    cleaned = get_engine("mysql").clean_options({"sql_mode": "ansi_quotes, STRICT_ALL_TABLES,ANSI_QUOTES"})
    assert cleaned["sql_mode"] == "ANSI_QUOTES,STRICT_ALL_TABLES"
    assert get_engine("mysql").clean_options({"sql_mode": ""})["sql_mode"] == ""
    with pytest.raises(OptionErrors) as caught:
        get_engine("mysql").clean_options({"sql_mode": "TRADITIONAL"})
    assert "TRADITIONAL" in caught.value.errors["sql_mode"]


def test_the_buffer_pool_is_whole_mib():
    with pytest.raises(OptionErrors) as caught:
        get_engine("mysql").clean_options({"innodb_buffer_pool_size": 16 * 1024**2 + 1})
    assert "MiB" in caught.value.errors["innodb_buffer_pool_size"]


@pytest.mark.parametrize("given", ["Kx", "Ex", "KEA", ""])
def test_redis_keyspace_events(given):
    assert get_engine("redis").clean_options({"notify_keyspace_events": given})["notify_keyspace_events"] == given


@pytest.mark.parametrize("given", ["x", "K", "Kq", "K E"])
def test_it_rejects_keyspace_events_redis_would_not_take(given):
    with pytest.raises(OptionErrors) as caught:
        get_engine("redis").clean_options({"notify_keyspace_events": given})
    assert "notify_keyspace_events" in caught.value.errors
