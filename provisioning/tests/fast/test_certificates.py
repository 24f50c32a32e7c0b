"""The portal's CA and instance certificates, over the fake backend (real servers: test_tls.py)."""

import ipaddress
from datetime import timedelta

import pytest
from cryptography import x509
from django.contrib.admin.sites import site
from django.utils import timezone

from provisioning.engines import ca_of, get_engine
from provisioning.models import CertificateAuthority, Instance
from provisioning.services import certificates

pytestmark = pytest.mark.django_db


def names_of(instance: Instance) -> set[str]:
    leaf = x509.load_pem_x509_certificate(instance.tls_certificate.encode())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} | set(names.get_values_for_type(x509.DNSName))


def test_an_instance_with_tls_off_gets_no_certificate_and_no_ca_is_made(create):
    instance = Instance.objects.get(pk=create("redis")["id"])
    assert instance.tls_certificate == "" and instance.tls_expires_at is None
    assert not CertificateAuthority.objects.exists()


def test_the_ca_is_made_once_and_signs_each_instance(create):
    first = Instance.objects.get(pk=create("redis", tls="required")["id"])
    second = Instance.objects.get(pk=create("mysql", tls="on")["id"])
    assert CertificateAuthority.objects.count() == 1
    ca = certificates.authority()
    assert ca_of(first) == ca_of(second) == ca.certificate
    ca_cert = x509.load_pem_x509_certificate(ca.certificate.encode())
    for instance in (first, second):
        leaf = x509.load_pem_x509_certificate(instance.tls_certificate.encode())
        leaf.verify_directly_issued_by(ca_cert)
        assert instance.tls_expires_at == leaf.not_valid_after_utc
        assert "PRIVATE KEY" in instance.tls_key and instance.tls_key != ca.key


def test_a_loopback_host_gets_every_loopback_name(create):
    instance = Instance.objects.get(pk=create("redis", tls="required")["id"])
    assert instance.host == "127.0.0.1"
    assert names_of(instance) == {"127.0.0.1", "::1", "localhost"}


@pytest.mark.parametrize(("host", "expected"), [("db.example.com", {"db.example.com"}), ("192.0.2.7", {"192.0.2.7"})])
def test_a_public_host_is_a_dns_name_or_an_ip_address(create, host, expected):
    instance = Instance.objects.get(pk=create("redis", tls="required")["id"])
    Instance.objects.filter(pk=instance.pk).update(host=host)
    instance.refresh_from_db()
    assert certificates.ensure(instance)  # it named the old host
    assert names_of(instance) == expected
    kinds = {type(name) for name in certificates.subject_names(host)}
    assert kinds == ({x509.IPAddress} if host[0].isdigit() else {x509.DNSName})
    if host[0].isdigit():
        ipaddress.ip_address(host)


def test_a_certificate_is_renewed_only_when_due(create):
    instance = Instance.objects.get(pk=create("redis", tls="required")["id"])
    now = timezone.now()
    assert not certificates.ensure(instance, now=now)
    assert certificates.renew_due(now=now) == 0
    later = instance.tls_expires_at - certificates.RENEW_BEFORE + timedelta(hours=1)
    old = instance.tls_certificate
    assert certificates.renew_due(now=later) == 1
    instance.refresh_from_db()
    assert instance.tls_certificate != old and instance.tls_expires_at > later + timedelta(days=300)


def test_a_pending_tls_gets_its_certificate_before_the_restart(create, act):
    body = create("mysql")
    Instance.objects.filter(pk=body["id"]).update(pending_options={"tls": "required"})
    act(body, "restart")
    assert Instance.objects.get(pk=body["id"]).tls_certificate


def test_config_and_snippets_speak_tls(api, create):
    redis_body = create("redis", tls="required")
    config = api.get(f"/api/storage/redis/instances/{redis_body['id']}/config").json()
    assert config["tls"] == "required" and config["uri"].startswith("rediss://")
    assert config["ca_certificate"] == certificates.ca_certificate()
    snippets = dict(get_engine("redis").snippets(config))
    assert "--tls --cacert stockroom-ca.pem" in snippets["CLI"]
    assert 'ssl_ca_certs="stockroom-ca.pem"' in snippets["Python"]

    mysql_body = create("mysql", tls="on")
    config = api.get(f"/api/storage/mysql/instances/{mysql_body['id']}/config").json()
    assert config["uri"].endswith("?ssl-mode=REQUIRED")
    snippets = dict(get_engine("mysql").snippets(config))
    assert "--ssl-ca=stockroom-ca.pem --ssl-verify-server-cert" in snippets["CLI"]
    assert 'ssl={"ca": "stockroom-ca.pem"}' in snippets["Python"]


def test_the_admin_shows_the_ca_but_never_its_key(admin_client, create):
    create("redis", tls="required")
    ca = certificates.authority()
    assert CertificateAuthority in site._registry
    page = admin_client.get(f"/admin/provisioning/certificateauthority/{ca.pk}/change/")
    assert page.status_code == 200
    assert b"BEGIN CERTIFICATE" in page.content
    assert ca.key.splitlines()[1].encode() not in page.content and b"PRIVATE KEY" not in page.content
    instance = Instance.objects.get()
    page = admin_client.get(f"/admin/provisioning/instance/{instance.pk}/change/")
    assert b"Tls expires at" in page.content or b"tls expires at" in page.content.lower()
    assert instance.tls_key.splitlines()[1].encode() not in page.content and b"PRIVATE KEY" not in page.content


def test_two_workers_that_make_the_ca_at_once_keep_one(monkeypatch):
    made = certificates._new_authority

    def another_worker_was_first():
        certificate, key, expires_at = made()
        CertificateAuthority.objects.create(
            name=certificates.CA_NAME, certificate=certificate, key=key, expires_at=expires_at
        )
        return made()  # this worker's own, made meanwhile

    monkeypatch.setattr(certificates, "_new_authority", another_worker_was_first)
    ca = certificates.authority()
    assert CertificateAuthority.objects.count() == 1
    assert ca.certificate == CertificateAuthority.objects.get().certificate
