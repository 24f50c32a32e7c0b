"""Port squatting, replayed against real servers (issue 11, point 5).

While an instance is stopped (or its server has died), anyone on the host may listen on its port.
The squatter here does what an attacker's would: it speaks enough of each protocol to be sent a
login (a MySQL greeting that asks for the clear-text password; Redis clients send AUTH at once) and
records every byte. The portal must send it nothing, and the instance must run again elsewhere.
"""

import contextlib
import os
import signal
import socket
import struct
import threading

import pymysql
import pytest
import redis

from provisioning.backends import listeners
from provisioning.backends.base import BaseBackend, StrangerOnPort, get_backend
from provisioning.backends.local import LocalBackend, processes_under
from provisioning.engines import Endpoint, get_engine
from provisioning.engines.redis import NO_RETRY
from provisioning.models import Instance
from provisioning.reconciler import Reconciler
from provisioning.services import DELETABLE

from .conftest import instance_dir, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

KINDS = ("mysql", "redis")


class Squatter:
    """Listens on 127.0.0.1:`port` and plays a `kind` server far enough to be sent a password."""

    def __init__(self, kind: str, port: int):
        self.kind, self.port = kind, port
        self.connections = 0
        self.received = b""
        self.lock = threading.Lock()
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no obstacle
        self.server.bind(("127.0.0.1", port))
        self.server.listen()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def __enter__(self) -> "Squatter":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept(); a close alone would leave it listening
        self.server.close()
        self.thread.join(5)
        assert not self.thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:  # closed
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._talk, args=(client,), daemon=True).start()

    def _talk(self, client: socket.socket) -> None:
        client.settimeout(2)
        try:
            if self.kind == "mysql":
                client.sendall(mysql_packet(0, mysql_greeting()))
                self._record(client.recv(65536))  # the handshake response: user, scramble, database
                # "Switch to mysql_clear_password": the client answers with the password itself.
                client.sendall(mysql_packet(2, b"\xfemysql_clear_password\x00"))
                self._record(client.recv(65536))
            else:
                while data := client.recv(65536):
                    self._record(data)
                    client.sendall(b"+OK\r\n")
        except OSError:
            pass
        finally:
            client.close()

    def _record(self, data: bytes) -> None:
        with self.lock:
            self.received += data


def mysql_packet(sequence: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([sequence]) + payload


def mysql_greeting(*, tls: bool = False) -> bytes:
    """A MariaDB 10.11 HandshakeV10 packet offering mysql_native_password, as a real server does;
    `tls`: offering TLS too, as one with a certificate does."""
    capabilities = 0x0001 | 0x0008 | 0x0200 | 0x2000 | 0x8000 | 0x80000  # protocol 4.1, secure conn., plugin auth
    capabilities |= 0x0800 if tls else 0
    return (
        b"\x0a5.5.5-10.11.6-MariaDB\x00"
        + struct.pack("<I", 7)
        + b"abcdefgh\x00"
        + struct.pack("<H", capabilities & 0xFFFF)
        + b"\x21"  # utf8
        + struct.pack("<H", 2)
        + struct.pack("<H", capabilities >> 16)
        + b"\x15"
        + b"\x00" * 10
        + b"ijklmnopqrst\x00"
        + b"mysql_native_password\x00"
    )


# Helpers ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def delete_what_each_test_made(api):
    yield
    left = Instance.objects.visible().filter(status__in=DELETABLE)
    for instance in left:
        api.delete(f"/api/storage/{instance.kind}/instances/{instance.pk}")
    for instance in left:
        wait_for_status(api, instance.kind, instance.pk, "gone")


def running(api, kind: str) -> tuple[int, dict]:
    # Redis: every write is on disk before it is answered, so a SIGKILL loses none.
    options = {"appendfsync": "always"} if kind == "redis" else {}
    pk = api.post(f"/api/storage/{kind}/instances", options).json()["id"]
    assert wait_for_status(api, kind, pk, "running", "failed")["status"] == "running"
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def act(api, kind: str, pk: int, action: str, *wanted: str) -> dict:
    response = api.post(f"/api/storage/{kind}/instances/{pk}/{action}")
    assert response.status_code == 202, response.content
    return wait_for_status(api, kind, pk, *wanted)


def write_note(kind: str, config: dict) -> None:
    """What the user keeps in the instance, as a real client writes it over TCP."""
    if kind == "mysql":
        with mysql(config) as db, db.cursor() as cursor:
            cursor.execute("CREATE TABLE notes (v VARCHAR(20))")
            cursor.execute("INSERT INTO notes VALUES ('before the stop')")
            db.commit()
    else:
        client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
        client.set("note", "before the stop")
        client.close()


def read_note(kind: str, config: dict) -> str:
    if kind == "mysql":
        with mysql(config) as db, db.cursor() as cursor:
            cursor.execute("SELECT v FROM notes")
            return cursor.fetchone()[0]
    client = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    try:
        return client.get("note").decode()
    finally:
        client.close()


def mysql(config: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"],
        port=config["port"],
        user=config["username"],
        password=config["password"],
        database=config["database"],
    )


def kill(instance: Instance) -> None:
    """What a crash does: the server is gone, and its port is free for anyone."""
    directory = instance_dir(instance.kind, instance.pk)
    for pid in processes_under(directory):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not processes_under(directory), 10, "the server to die")


# The squatter is a real threat -------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_login_over_tcp_would_hand_the_squatter_the_password(alice, unused_port, kind):
    """Proof that the squatter catches what a client sends: the attack the tests below replay."""
    instance = Instance(kind=kind, owner=alice, username="app", database="app", password="plain-secret-1234")
    with Squatter(kind, unused_port) as squatter, contextlib.suppress(Exception):  # it may or may not "succeed"
        get_engine(kind).check_login(instance, Endpoint("127.0.0.1", unused_port), timeout=2)
    assert squatter.connections == 1
    assert b"plain-secret-1234" in squatter.received


# The attack on a start, through the API ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_start_sends_a_squatter_nothing_and_moves_to_a_free_port(api, receiver, kind):
    assert api.post("/api/webhooks", {"url": receiver.url}).status_code == 201
    pk, config = running(api, kind)
    old = config["port"]
    write_note(kind, config)
    assert act(api, kind, pk, "stop", "stopped", "unhealthy")["status"] == "stopped"

    with Squatter(kind, old) as squatter:
        started = act(api, kind, pk, "start", "running", "stopped", "unhealthy")
    assert config["password"].encode() not in squatter.received
    assert squatter.connections == 0 and squatter.received == b""

    assert started["status"] == "running", started["status_message"]
    new = api.get(f"/api/storage/{kind}/instances/{pk}/config").json()
    assert new["port"] == started["port"] != old
    moved = f"Port {old} was taken by another process; moved to {new['port']}."
    assert started["status_message"] == f"Started; a login succeeded. {moved}"
    event = api.get(f"/api/storage/{kind}/instances/{pk}/events?page_size=100").json()["results"][-1]
    assert (event["from"], event["to"], event["reason"]) == ("starting", "running", started["status_message"])
    wait_until(lambda: any(moved in e["reason"] for e in receiver.events()), 10, "the webhook saying it moved")
    assert new["password"] == config["password"]
    assert read_note(kind, new) == "before the stop"  # a real client, over TCP, on the new port


# The reconciler's probe and the heal that follows -----------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_the_reconcilers_probe_sends_a_squatter_nothing_and_the_heal_moves(api, settings, kind):
    settings.STOCKROOM_RESTART_BACKOFF = 0
    pk, config = running(api, kind)
    old = config["port"]
    write_note(kind, config)
    instance = Instance.objects.get(pk=pk)
    kill(instance)

    with Squatter(kind, old) as squatter:
        report = Reconciler().run_once()  # probes, marks it unhealthy, and heals it (tasks run inline)
    assert config["password"].encode() not in squatter.received
    assert squatter.connections == 0 and squatter.received == b""

    assert report.unhealthy == [pk] and report.heals == [pk]
    instance.refresh_from_db()
    assert instance.status == "running" and instance.port != old
    assert instance.status_message == (
        f"Restarted after it stopped answering (attempt 1). Port {old} was taken by another process; "
        f"moved to {instance.port}."
    )
    assert read_note(kind, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()) == "before the stop"


# Where only TCP will do: the listener is checked first --------------------------------------


class TcpLoginBackend(LocalBackend):
    """The local backend, logging in over TCP as a bridged container's backend must."""

    def login_endpoint(self, instance: Instance) -> Endpoint:
        return BaseBackend.login_endpoint(self, instance)


@pytest.fixture
def tcp_backend(settings) -> TcpLoginBackend:
    local = settings.STOCKROOM_BACKENDS["local"]
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "tcp": {**local, "BACKEND": f"{__name__}.TcpLoginBackend"},
    }
    settings.STOCKROOM_DEFAULT_BACKEND = "tcp"
    return get_backend("tcp")


@pytest.mark.parametrize("kind", KINDS)
def test_over_tcp_only_the_instances_own_listener_is_sent_a_login(api, tcp_backend, kind):
    pk, config = running(api, kind)  # its logins went over TCP, to a listener seen to be its own
    instance = Instance.objects.get(pk=pk)
    assert instance.backend == "tcp" and tcp_backend.holds_port(instance)
    tcp_backend.probe(instance)
    kill(instance)

    with pytest.raises(ConnectionRefusedError, match=f"Nothing listens on port {config['port']}"):
        tcp_backend.probe(instance)
    with Squatter(kind, config["port"]) as squatter:
        assert not tcp_backend.holds_port(instance)
        with pytest.raises(StrangerOnPort):
            tcp_backend.probe(instance)
        assert tcp_backend.login_error(instance, timeout=1, tries=2, pause=0) == "StrangerOnPort"
    assert squatter.connections == 0 and squatter.received == b""


def test_a_portal_that_cannot_read_a_servers_descriptors_checks_who_owns_the_listener(api, monkeypatch, unused_port):
    if os.geteuid() != 0:
        pytest.skip("the servers must run as another user than this test's squatter: only root can do that")
    pk, config = running(api, "redis")
    server = processes_under(instance_dir("redis", pk))
    assert listeners.owners(server) != {0}, "the server runs as the instances' user"
    # What a portal that is not root sees of another user's processes: not which sockets they hold.
    monkeypatch.setattr(listeners, "sockets_held_by", lambda pids: None)
    assert listeners.only_held_by("127.0.0.1", config["port"], server)
    with Squatter("redis", unused_port) as squatter:  # root's: not the user the server runs as
        assert not listeners.only_held_by("127.0.0.1", unused_port, server)
        assert listeners.only_held_by("127.0.0.1", unused_port, [os.getpid()]), "the same user would pass"
    assert squatter.connections == 0
