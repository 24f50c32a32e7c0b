"""What makes a kind lives in its engine folder: no other module of the app names a kind."""

import io
import re
from pathlib import Path

import pytest
from django.conf import settings

from provisioning.backends.base import BackendError
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


def test_redis_reads_the_seconds_an_append_only_file_begins_and_ends_with_by_its_commands():
    """A value may hold `#TS:` text: only the annotations between commands count."""
    from provisioning.engines.redis import _stamps

    def command(*words: bytes) -> bytes:
        return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(word), word) for word in words)

    fake = b"x\n#TS:99999999999\r\n"
    stamped = b"#TS:2000\r\n" + command(b"SET", b"a", fake) + b"#TS:2003\r\n" + command(b"SET", b"b", b"1")
    assert _stamps(io.BytesIO(stamped), "f") == (2000, 2003)
    assert _stamps(io.BytesIO(command(b"SET", b"a", fake)), "f") == (None, None)
    assert _stamps(io.BytesIO(command(b"DEL", b"a") + b"#TS:7\r\n"), "f") == (None, 7)
    assert _stamps(io.BytesIO(b""), "f") == (None, None)
    with pytest.raises(BackendError, match="not an append-only file"):
        _stamps(io.BytesIO(b"*2\r\nSET\r\n"), "f")


def test_a_redis_replay_refuses_a_gap_in_the_archived_files():
    from datetime import UTC, datetime

    from provisioning.engines import ArchivedLog, Replay
    from provisioning.engines.redis import _replayed

    def log(seq: int) -> ArchivedLog:
        return ArchivedLog(name=f"appendonly.aof.{seq}.incr.aof", opened_at=None, open=io.BytesIO)

    until = datetime(2026, 1, 1, tzinfo=UTC)
    whole = Replay(start="appendonly.aof.2.incr.aof", until=until, logs=[log(2), log(3), log(4)])
    assert [chosen.name for chosen in _replayed(whole)] == [log(n).name for n in (2, 3, 4)]
    with pytest.raises(BackendError, match=r"appendonly\.aof\.3\.incr\.aof was never archived"):
        _replayed(Replay(start="appendonly.aof.2.incr.aof", until=until, logs=[log(2), log(4)]))


def test_a_mysql_replay_refuses_a_gap_in_the_archived_binary_logs():
    from datetime import UTC, datetime

    from provisioning.engines import ArchivedLog, Replay
    from provisioning.engines.mysql import _replayed

    until = datetime(2026, 1, 1, tzinfo=UTC)

    def logs(*numbers: int, opened: datetime | None = None) -> list[ArchivedLog]:
        return [ArchivedLog(name=f"binlog.{n:06d}", opened_at=opened, open=io.BytesIO) for n in numbers]

    def replay(*archived: ArchivedLog) -> Replay:
        return Replay(start="", until=until, logs=list(archived))

    assert [log.name for log in _replayed(replay(*logs(8, 9, 10)), "binlog.000009")] == [
        "binlog.000009",
        "binlog.000010",
    ]
    # In the order of their numbers, not of their names.
    chosen = _replayed(replay(*logs(1000000, 999999)), "binlog.999999")
    assert [log.name for log in chosen] == ["binlog.999999", "binlog.1000000"]
    with pytest.raises(BackendError, match=r"after binlog\.000010 was never archived"):
        _replayed(replay(*logs(9, 10, 12)), "binlog.000009")
    # A log opened after the time is not replayed, and a gap before it is still one.
    assert [log.name for log in _replayed(replay(*logs(9, 10), *logs(11, opened=until)), "binlog.000009")] == [
        "binlog.000009",
        "binlog.000010",
    ]
    with pytest.raises(BackendError, match="after binlog.000010 was never archived"):
        _replayed(replay(*logs(9, 10), *logs(12, opened=until)), "binlog.000009")
