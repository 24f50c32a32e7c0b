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
    }


def test_it_collects_every_error_at_once():
    with pytest.raises(OptionErrors) as caught:
        get_engine("redis").clean_options({"maxclients": 0, "appendfsync": "sometimes", "colour": "red"})
    assert set(caught.value.errors) == {"maxclients", "appendfsync", "colour"}
