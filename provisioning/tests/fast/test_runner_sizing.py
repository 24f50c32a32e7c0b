"""`make run`'s sizes come from the environment: a bigger host sets them, the defaults suit 2 cores."""

from pathlib import Path

import pytest

from portal.runner import components


def argv_of(name: str) -> list[str]:
    [component] = [c for c in components(port=8000, broker_config=Path("redis.conf"), concurrency=8) if c.name == name]
    return component.argv


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_gunicorn_runs_2_workers_of_4_threads_unless_told(monkeypatch):
    monkeypatch.delenv("WEB_WORKERS", raising=False)
    monkeypatch.delenv("WEB_THREADS", raising=False)
    web = argv_of("web")
    assert (option(web, "--workers"), option(web, "--threads")) == ("2", "4")


@pytest.mark.parametrize(("workers", "threads"), [("8", "4"), ("1", "3")])
def test_gunicorn_takes_its_workers_and_threads_from_the_environment(monkeypatch, workers, threads):
    monkeypatch.setenv("WEB_WORKERS", workers)
    monkeypatch.setenv("WEB_THREADS", threads)
    web = argv_of("web")
    assert (option(web, "--workers"), option(web, "--threads")) == (workers, threads)


@pytest.mark.parametrize(("name", "value"), [("WEB_WORKERS", "0"), ("WEB_WORKERS", "two"), ("WEB_THREADS", "2")])
def test_a_size_that_is_no_count_or_lets_waits_hold_every_thread_stops_make_run(monkeypatch, settings, name, value):
    """With STOCKROOM_WAITING_REQUESTS (2) waits allowed per process, 2 threads could all be waiting."""
    settings.STOCKROOM_WAITING_REQUESTS = 2
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=name):
        argv_of("web")
