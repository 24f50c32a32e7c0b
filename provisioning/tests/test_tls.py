"""TLS against real servers on the local backend: a client that verifies the portal's CA connects,
the certificate names the instance's host, `required` refuses plaintext, and the portal's probe
keeps the instance running. The CA's key never reaches a disk or an answer in plain text."""

import os
import socket
import ssl
import stat
import subprocess
from datetime import timedelta
from pathlib import Path

import pymysql
import pytest
import redis
from cryptography import x509
from django.conf import settings
from django.db import connection
from django.utils import timezone

from provisioning.backends.base import get_backend
from provisioning.backends.local import processes_under
from provisioning.engines.redis import NO_RETRY
from provisioning.models import CertificateAuthority, Instance, Status
from provisioning.reconciler import Reconciler
from provisioning.services import certificates

from .conftest import instance_dir, wait_for_status
from .test_docker_backend import DOCKER_URL, IMAGE

pytestmark = pytest.mark.django_db(transaction=True)


def create(api, kind: str, timeout: float = 60, **options) -> tuple[int, dict]:
    response = api.post(f"/api/storage/{kind}/instances", options, format="json")
    assert response.status_code == 202, response.json()
    pk = response.json()["id"]
    body = wait_for_status(api, kind, pk, "running", "failed", timeout=timeout)
    assert body["status"] == "running", body["status_message"]
    return pk, api.get(f"/api/storage/{kind}/instances/{pk}/config").json()


def delete(api, kind: str, pk: int, timeout: float = 60) -> None:
    api.delete(f"/api/storage/{kind}/instances/{pk}")
    wait_for_status(api, kind, pk, "gone", timeout=timeout)


def patch_tls(api, kind: str, pk: int, tls: str | None):
    """The change as a user makes it: a PATCH, which keeps a restart option pending."""
    response = api.patch(f"/api/storage/{kind}/instances/{pk}", {"tls": tls}, format="json")
    assert response.status_code == 202, response.content
    return response


def apply_now(api, kind: str, pk: int, timeout: float = 60) -> None:
    """Restart to apply what is pending (`?apply=now`), and wait until it runs again."""
    response = api.patch(f"/api/storage/{kind}/instances/{pk}?apply=now", {}, format="json")
    assert response.status_code == 202, response.content
    body = wait_for_status(api, kind, pk, "running", "unhealthy", "failed", timeout=timeout)
    assert body["status"] == "running", body["status_message"]
    assert body["pending_options"] == {}


def write_ca(tmp_path: Path, config: dict) -> str:
    path = tmp_path / "stockroom-ca.pem"
    path.write_text(config["ca_certificate"])
    return str(path)


def served_certificate(host: str, port: int, ca: str) -> x509.Certificate:
    """The certificate the server presents, after the handshake verified it against `ca` and
    checked that it names `host`."""
    context = ssl.create_default_context(cafile=ca)
    assert context.check_hostname
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def probe_keeps_it_running(kind: str, pk: int) -> None:
    instance = Instance.objects.get(pk=pk)
    get_backend(instance.backend).probe(instance)  # over the socket, as the reconciler does
    assert Instance.objects.get(pk=pk).status == Status.RUNNING


# Redis --------------------------------------------------------------------------------------------


def test_redis_tls_required_verifies_and_refuses_plaintext(api, tmp_path):
    pk, config = create(api, "redis", tls="required")
    assert config["tls"] == "required"
    assert config["uri"].startswith("rediss://default:")
    assert "BEGIN CERTIFICATE" in config["ca_certificate"]
    ca = write_ca(tmp_path, config)

    # A client that verifies the CA and the host name connects; so does the URI the API gives.
    client = redis.Redis(
        host=config["host"], port=config["port"], password=config["password"], ssl=True, ssl_ca_certs=ca,
        ssl_check_hostname=True, retry=NO_RETRY,
    )  # fmt: skip
    client.set("greeting", "over tls")
    assert client.get("greeting") == b"over tls"
    client.close()
    from_uri = redis.Redis.from_url(config["uri"], ssl_ca_certs=ca, retry=NO_RETRY)
    assert from_uri.get("greeting") == b"over tls"
    from_uri.close()

    leaf = served_certificate(config["host"], config["port"], ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert config["host"] in [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(
        x509.DNSName
    )

    # Plaintext on the port: the server speaks only TLS, so a plain client gets no answer.
    plain = redis.Redis(
        host=config["host"], port=config["port"], password=config["password"], socket_timeout=3, retry=NO_RETRY
    )
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()
    # A client that does not trust the portal's CA is refused by its own check.
    with pytest.raises(redis.ConnectionError):
        redis.Redis(
            host=config["host"], port=config["port"], password=config["password"], ssl=True, retry=NO_RETRY
        ).ping()

    probe_keeps_it_running("redis", pk)
    key_readable_by_its_server_only("redis", pk)
    delete(api, "redis", pk)


def key_readable_by_its_server_only(kind: str, pk: int) -> None:
    """The server's key is root's, readable by its server's group (its uid's own) and nobody else;
    another uid cannot read it."""
    key = instance_dir(kind, pk) / "tls-key.pem"
    assert "PRIVATE KEY" in key.read_text()
    status = key.stat()
    if os.geteuid() != 0:
        assert stat.S_IMODE(status.st_mode) == 0o600
        return
    (server,) = processes_under(instance_dir(kind, pk))
    server_gid = os.stat(f"/proc/{server}").st_gid
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (0, server_gid, 0o640)
    stranger = subprocess.run(["cat", str(key)], user=65534, group=65534, capture_output=True, text=True)
    assert stranger.returncode != 0 and "PRIVATE KEY" not in stranger.stdout


def test_redis_tls_by_patch_pending_until_the_restart_and_off_again(api, tmp_path):
    pk, config = create(api, "redis")
    assert config["tls"] == "off" and config["ca_certificate"] == "" and config["uri"].startswith("redis://")
    plain = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert plain.ping()
    plain.close()

    # A PATCH makes it pending: the running server still speaks plaintext until the restart.
    response = patch_tls(api, "redis", pk, "required")
    assert response.json()["pending_options"] == {"tls": "required"}
    plain = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert plain.ping()
    plain.close()
    apply_now(api, "redis", pk)
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    ca = write_ca(tmp_path, config)
    tls = redis.Redis.from_url(config["uri"], ssl_ca_certs=ca, retry=NO_RETRY)
    assert tls.ping()
    tls.close()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(
            host=config["host"], port=config["port"], password=config["password"], socket_timeout=3, retry=NO_RETRY
        ).ping()

    # Off again (null: the default): plaintext on the same port, and the config no longer speaks of TLS.
    patch_tls(api, "redis", pk, None)
    apply_now(api, "redis", pk)
    config = api.get(f"/api/storage/redis/instances/{pk}/config").json()
    assert config["uri"].startswith("redis://") and config["ca_certificate"] == ""
    plain = redis.Redis(host=config["host"], port=config["port"], password=config["password"], retry=NO_RETRY)
    assert plain.ping()
    plain.close()
    assert (instance_dir("redis", pk) / "tls-key.pem").read_text() == ""  # the key is not left behind
    delete(api, "redis", pk)


# MySQL --------------------------------------------------------------------------------------------


def mysql_connect(config: dict, **extra) -> pymysql.Connection:
    return pymysql.connect(
        host=config["host"], port=config["port"], user=config["username"], password=config["password"],
        database=config["database"], connect_timeout=5, **extra,
    )  # fmt: skip


def cipher(db: pymysql.Connection) -> str:
    with db.cursor() as cursor:
        cursor.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        return cursor.fetchone()[1]


def test_mysql_tls_required_verifies_and_refuses_plaintext(api, tmp_path):
    pk, config = create(api, "mysql", tls="required")
    assert config["tls"] == "required"
    assert config["uri"].endswith("?ssl-mode=REQUIRED")
    ca = write_ca(tmp_path, config)

    # Verified against the CA, the host name checked (PyMySQL: check_hostname with a CA).
    with mysql_connect(config, ssl={"ca": ca, "check_hostname": True}) as db:
        assert cipher(db)
    # A client that does not trust the portal's CA is refused by its own check.
    with pytest.raises(pymysql.err.OperationalError):
        mysql_connect(config, ssl=ssl.create_default_context())  # the system's CAs only
    # Plaintext (PyMySQL uses TLS by itself when a server offers it): the server refuses the login.
    with pytest.raises(pymysql.err.OperationalError) as refused:
        mysql_connect(config, ssl_disabled=True)
    # MariaDB 10.11 answers as to a wrong password; the same login in plaintext works under `on`
    # (test_mysql_tls_on_offers_tls_and_still_takes_plaintext).
    assert refused.value.args[0] == 1045, refused.value.args

    probe_keeps_it_running("mysql", pk)
    delete(api, "mysql", pk)


def test_mysql_tls_on_offers_tls_and_still_takes_plaintext(api, tmp_path):
    pk, config = create(api, "mysql", tls="on")
    ca = write_ca(tmp_path, config)
    with mysql_connect(config, ssl={"ca": ca, "check_hostname": True}) as db:
        assert cipher(db)
    with mysql_connect(config, ssl_disabled=True) as db:
        assert cipher(db) == ""
    delete(api, "mysql", pk)


# Renewal ------------------------------------------------------------------------------------------


def mysql_served_serial(config: dict, ca: str) -> int:
    with mysql_connect(config, ssl={"ca": ca, "check_hostname": True}) as db:
        return x509.load_der_x509_certificate(db._sock.getpeercert(binary_form=True)).serial_number


@pytest.mark.parametrize("kind", ["redis", "mysql"])
def test_a_certificate_due_is_renewed_and_the_running_server_takes_it(api, tmp_path, kind):
    pk, config = create(api, kind, tls="required")
    ca = write_ca(tmp_path, config)
    serial = {
        "redis": lambda: served_certificate(config["host"], config["port"], ca).serial_number,
        "mysql": lambda: mysql_served_serial(config, ca),
    }[kind]
    before, servers = serial(), processes_under(instance_dir(kind, pk))
    instance = Instance.objects.get(pk=pk)
    assert x509.load_pem_x509_certificate(instance.tls_certificate.encode()).serial_number == before

    # Not yet due: nothing changes.
    assert certificates.renew_due(now=timezone.now()) == 0
    # Due within RENEW_BEFORE: the reconciler renews it, and the same server serves the new one.
    Instance.objects.filter(pk=pk).update(tls_expires_at=timezone.now() + timedelta(days=3))
    report = Reconciler().run_once()
    assert report.certificates_renewed == 1, report
    renewed = Instance.objects.get(pk=pk)
    assert renewed.tls_expires_at > timezone.now() + timedelta(days=300)
    after = serial()
    assert after != before
    assert x509.load_pem_x509_certificate(renewed.tls_certificate.encode()).serial_number == after
    assert processes_under(instance_dir(kind, pk)) == servers  # no restart
    delete(api, kind, pk)


# The CA's key -------------------------------------------------------------------------------------


def test_the_ca_key_is_never_on_disk_or_in_an_answer_in_plain_text(api, alice, client, tmp_path):
    pk, config = create(api, "redis", tls="required")
    ca = CertificateAuthority.objects.get(name=certificates.CA_NAME)
    key = ca.key
    assert "PRIVATE KEY" in key
    body = key.splitlines()[1]  # a line of the key's base64, as an attacker would grep for it

    # The database row holds it encrypted.
    with connection.cursor() as cursor:
        cursor.execute("SELECT key FROM provisioning_certificateauthority WHERE name = %s", [ca.name])
        stored = cursor.fetchone()[0]
    assert "PRIVATE KEY" not in stored and body not in stored

    # No file the portal wrote (instances, snapshots, its data folder) holds it.
    for root in {Path(settings.DATA_DIR), Path(settings.STOCKROOM_INSTANCES_DIR)}:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 16 * 1024 * 1024:
                data = path.read_bytes()
                assert body.encode() not in data, f"the CA's key is in {path}"

    # Nor any answer: the API's, the page's, the CA download's.
    answers = [
        api.get(f"/api/storage/redis/instances/{pk}").content,
        api.get(f"/api/storage/redis/instances/{pk}/config").content,
    ]
    client.force_login(alice)
    answers += [client.get(f"/instances/{pk}/").content, client.get(f"/instances/{pk}/ca.pem").content]
    for answer in answers:
        assert body.encode() not in answer and b"PRIVATE KEY" not in answer
    delete(api, "redis", pk)


def test_download_ca_is_the_owners_only(api, alice, charlie, client):
    pk, config = create(api, "redis", tls="required")
    client.force_login(alice)
    response = client.get(f"/instances/{pk}/ca.pem")
    assert response.status_code == 200
    assert response.content.decode() == config["ca_certificate"]
    assert b"Download CA" in client.get(f"/instances/{pk}/").content
    client.force_login(charlie)
    assert client.get(f"/instances/{pk}/ca.pem").status_code == 404
    client.logout()
    assert client.get(f"/instances/{pk}/ca.pem").status_code == 302  # to the sign-in page
    delete(api, "redis", pk)


# The Docker backend -------------------------------------------------------------------------------
#
# The portal logs in to a container over TCP (its checked listener), so under `required` its probe
# goes over TLS, verified against the CA. A portal id of these tests' own: the fixture's clean-up
# removes every container of its portal id, and other test runs may share the Docker engine.

DOCKER_PORTAL = "stockroom-tests-tls"


@pytest.fixture
def docker_backend(settings):
    """test_docker_backend.py's settings, with a portal id of these tests' own."""
    if not IMAGE:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the Docker tests: scripts/ensure-docker did not provide an image.")
        pytest.skip("no Docker engine or test image (make test prepares them)")
    options = {
        "base_url": DOCKER_URL,
        "volume_root": str(settings.DATA_DIR / "docker"),
        "host_ip": "127.0.0.1",
        "images": {"mysql": IMAGE, "redis": IMAGE},
        "network_mode": "host",
        "portal_id": DOCKER_PORTAL,
    }
    settings.STOCKROOM_BACKENDS = {
        **settings.STOCKROOM_BACKENDS,
        "docker": {"BACKEND": "provisioning.backends.docker.DockerBackend", "OPTIONS": options},
    }
    settings.STOCKROOM_DEFAULT_BACKEND = "docker"
    backend = get_backend("docker")
    yield backend
    for container in backend.orphans(known_ids=set()):  # what a test that failed half way left
        backend.remove_orphan(container)
    backend.forget_ready()


def test_docker_redis_tls_required(api, docker_backend, tmp_path):
    pk, config = create(api, "redis", tls="required", timeout=120)
    ca = write_ca(tmp_path, config)
    client = redis.Redis.from_url(config["uri"], ssl_ca_certs=ca, retry=NO_RETRY)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    served_certificate(config["host"], config["port"], ca)
    with pytest.raises(redis.ConnectionError):
        redis.Redis(
            host=config["host"], port=config["port"], password=config["password"], socket_timeout=3, retry=NO_RETRY
        ).ping()
    probe_keeps_it_running("redis", pk)
    delete(api, "redis", pk, timeout=120)


def test_docker_mysql_tls_by_patch_taken_at_restart(api, docker_backend, tmp_path):
    pk, config = create(api, "mysql", timeout=120)
    with mysql_connect(config, ssl_disabled=True) as db:
        assert cipher(db) == ""

    patch_tls(api, "mysql", pk, "required")
    apply_now(api, "mysql", pk, timeout=120)

    config = api.get(f"/api/storage/mysql/instances/{pk}/config").json()
    ca = write_ca(tmp_path, config)
    with mysql_connect(config, ssl={"ca": ca, "check_hostname": True}) as db:
        assert cipher(db)
    with pytest.raises(pymysql.err.OperationalError):
        mysql_connect(config, ssl_disabled=True)
    probe_keeps_it_running("mysql", pk)
    delete(api, "mysql", pk, timeout=120)
