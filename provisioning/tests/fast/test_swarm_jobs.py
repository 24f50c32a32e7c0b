"""How the swarm backend takes a job's connection back (`SwarmBackend._stream`): only a connection
from the job's node that opens with its one-time token is read; any other is closed unheard."""

import io
import socket
import threading

import pytest

from provisioning.backends.base import Node
from provisioning.backends.fake import FakeFleetBackend
from provisioning.backends.swarm import SwarmBackend
from provisioning.errors import BackendError


class NoSwarm(SwarmBackend):
    def _failed(self, service) -> bool:  # no manager here: the job never fails
        return False


def test_only_the_connection_that_opens_with_the_token_is_read():
    backend = NoSwarm("swarm", manager_url="", portal_address="127.0.0.1", data_root="/x", images={}, job_timeout=10)
    token = "a" * 64
    answers = {}
    sent = threading.Event()

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def attacker() -> None:
            with socket.create_connection(("127.0.0.1", port)) as intruder:
                intruder.sendall(b"b" * 64 + b"\nstolen rows")
                sent.set()
                try:
                    answers["attacker"] = intruder.recv(100)  # closed on it: nothing
                except ConnectionResetError:  # closed with its bytes unread
                    answers["attacker"] = b""

        def job() -> None:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(token.encode() + b"\n")
                answers["job"] = connection.recv(100)  # what the portal sent it
                connection.sendall(b"the snapshot")

        first, second = threading.Thread(target=attacker), threading.Thread(target=job)
        first.start()
        assert sent.wait(5)  # the first connection in the queue is the attacker's
        second.start()
        out = io.BytesIO()
        backend._stream(None, listener, token, io.BytesIO(b"its input"), out, what="cat", peer="127.0.0.1")
        first.join(5)
        second.join(5)

    assert out.getvalue() == b"the snapshot"
    assert answers == {"attacker": b"", "job": b"its input"}


def test_a_connection_from_another_address_is_closed_even_with_the_token():
    backend = NoSwarm("swarm", manager_url="", portal_address="127.0.0.1", data_root="/x", images={}, job_timeout=2)
    token = "a" * 64
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as thief:
            thief.sendall(token.encode() + b"\nstolen rows")
            out = io.BytesIO()
            backend._stream(None, listener, token, io.BytesIO(b"its input"), out, what="cat", peer="10.213.0.2")
            assert closed(thief)
    assert out.getvalue() == b""


def closed(connection: socket.socket) -> bool:
    """Whether the other end closed it (with what it was sent unread, a reset)."""
    try:
        return connection.recv(100) == b""
    except ConnectionResetError:
        return True


def test_tasks_are_ordered_by_when_they_changed_not_by_their_stamps_as_text():
    class Listed(NoSwarm):
        client = type("Client", (), {"api": type("Api", (), {"tasks": staticmethod(lambda filters: list(stamps))})})

    stamps = [
        {"ID": "older", "UpdatedAt": "2026-11-28T10:00:05.2Z"},
        {"ID": "oldest", "UpdatedAt": "2026-11-28T10:00:05Z"},
        {"ID": "newest", "UpdatedAt": "2026-11-28T10:00:05.987654321Z"},
    ]
    backend = Listed("swarm", manager_url="", portal_address="127.0.0.1", data_root="/x", images={})
    assert [task["ID"] for task in backend._tasks_of("s")] == ["newest", "older", "oldest"]


@pytest.mark.parametrize("availability", ["drain", "paused", ""])
def test_the_fake_fleet_refuses_what_the_swarm_backend_refuses(availability):
    """The fast tier's fleet (`FakeFleetBackend`) must not accept what the real backend refuses."""
    real = NoSwarm("swarm", manager_url="", portal_address="127.0.0.1", data_root="/x", images={})
    fake = FakeFleetBackend("fleet")
    for backend in (real, fake):
        with pytest.raises(BackendError, match="active or pause, not"):
            backend.set_availability("n1", availability)


def test_one_image_for_both_kinds_gives_each_kind_its_own_version(monkeypatch):
    """The tests (and an operator) may run MySQL and Redis from one image: the version a kind's
    program reports is that kind's, whichever kind was asked first."""
    said = {"redis-server": "Redis server v=7.0.15 sha=0", "mariadbd": "mariadbd  Ver 10.11.6-MariaDB-0+deb12u1 for x"}
    node = Node("n1", "db", "10.0.0.2", "10.0.0.2", "ready", "active", "worker", True, 2**30)
    backend = NoSwarm("swarm", manager_url="", portal_address="127.0.0.1", data_root="/x", images={})
    monkeypatch.setattr(SwarmBackend, "_versions", {})
    monkeypatch.setattr(backend, "_image", lambda kind: "one-image")
    monkeypatch.setattr(backend, "nodes", lambda fresh=False: [node])
    monkeypatch.setattr(backend, "_job", lambda node, argv, **kwargs: said[argv[0]])

    assert backend.host_version("redis") == "7.0.15"
    assert backend.host_version("mysql") == "10.11.6-MariaDB-0+deb12u1"
    assert backend.host_version("redis") == "7.0.15"
