"""TLS: the portal's own certificate authority, and each instance's certificate for its public host.

The CA is made once (the first instance that asks for TLS makes it) and kept in the database, its
key encrypted with STOCKROOM_ENCRYPTION_KEYS: it is never written to a disk in plain text, and no
answer of the portal's shows it. Each instance with `tls` on gets a certificate for the host users
connect to, kept on the instance with its own key (encrypted too); the backend writes them into the
instance's config folder, readable by its server's uid only, before the server starts. The
reconciler renews a certificate RENEW_BEFORE its expiry; the server takes it at once where its
engine can reload it (`BaseBackend.reload_tls`), else at its next restart.
"""

import ipaddress
import logging
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from django.db import IntegrityError, transaction
from django.utils import timezone

from ..backends.base import get_backend
from ..models import CertificateAuthority, Instance, Status
from ..options import TLS_OFF

logger = logging.getLogger(__name__)

CA_NAME = "portal"
CA_LIFETIME = timedelta(days=3650)
CERTIFICATE_LIFETIME = timedelta(days=365)
RENEW_BEFORE = timedelta(days=30)
LOCAL_NAMES = {"127.0.0.1", "localhost", "::1"}


def authority() -> CertificateAuthority:
    """The portal's CA, made on first use. Two workers that make it at once keep one: the other's
    is thrown away before anything is signed with it."""
    try:
        return CertificateAuthority.objects.get(name=CA_NAME)
    except CertificateAuthority.DoesNotExist:
        pass
    certificate, key, expires_at = _new_authority()
    try:
        with transaction.atomic():
            ca, _ = CertificateAuthority.objects.get_or_create(
                name=CA_NAME, defaults={"certificate": certificate, "key": key, "expires_at": expires_at}
            )
    except IntegrityError:  # made by another worker between the get and the insert
        ca = CertificateAuthority.objects.get(name=CA_NAME)
    return ca


def ca_certificate() -> str:
    """The CA's certificate (PEM), what clients verify instances with; never its key."""
    return authority().certificate


def _new_authority() -> tuple[str, str, datetime]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = timezone.now().replace(microsecond=0)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stockroom portal CA")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pem(certificate), _key_pem(key), now + CA_LIFETIME


def subject_names(host: str) -> list[x509.GeneralName]:
    """The names a certificate for `host` holds: an address as an IP name, a name as a DNS name;
    this host's loopback names all, if it is one of them."""
    hosts = sorted(LOCAL_NAMES) if host in LOCAL_NAMES else [host]
    names: list[x509.GeneralName] = []
    for each in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(each)))
        except ValueError:
            names.append(x509.DNSName(each))
    return names


def issue(instance: Instance, *, now: datetime | None = None) -> None:
    """Give `instance` a new certificate for its host, signed by the CA, and save it. The instance's
    `tls_certificate` is the server's chain: its own certificate, then the CA's."""
    now = (now or timezone.now()).replace(microsecond=0)  # what a certificate can say
    ca = authority()
    ca_cert = x509.load_pem_x509_certificate(ca.certificate.encode())
    ca_key = serialization.load_pem_private_key(ca.key.encode(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    expires_at = min(now + CERTIFICATE_LIFETIME, ca_cert.not_valid_after_utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, instance.host[:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(expires_at)
        .add_extension(x509.SubjectAlternativeName(subject_names(instance.host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    instance.tls_certificate = _pem(certificate) + ca.certificate
    instance.tls_key = _key_pem(key)
    instance.tls_expires_at = expires_at
    Instance.objects.filter(pk=instance.pk).update(
        tls_certificate=instance.tls_certificate, tls_key=instance.tls_key, tls_expires_at=expires_at
    )
    logger.info("Issued a TLS certificate for instance %s (%s), valid until %s", instance.pk, instance.host, expires_at)


def wants_tls(instance: Instance) -> bool:
    """Whether the instance's server serves TLS, or will from its next restart: its `tls` option
    is on, or its backend administers it across a network (over TLS: `BaseBackend.remote_admin`)."""
    options: dict[str, Any] = {**instance.options, **(instance.pending_options or {})}
    return options.get("tls", TLS_OFF) != TLS_OFF or get_backend(instance.backend).remote_admin


def needs_certificate(instance: Instance, *, now: datetime) -> bool:
    """Whether `ensure` would issue: TLS is wanted and the certificate is missing, expires within
    RENEW_BEFORE, or names another host."""
    if not wants_tls(instance):
        return False
    if not instance.tls_certificate or not instance.tls_key or instance.tls_expires_at is None:
        return True
    if instance.tls_expires_at - now < RENEW_BEFORE:
        return True
    leaf = x509.load_pem_x509_certificate(instance.tls_certificate.encode())
    return bool(leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != instance.host[:64])


def ensure(instance: Instance, *, now: datetime | None = None) -> bool:
    """Before a server starts: a certificate if the instance wants TLS and has none that will do.
    Returns whether one was issued."""
    now = now or timezone.now()
    if needs_certificate(instance, now=now):
        issue(instance, now=now)
        return True
    return False


def renew_due(*, now: datetime) -> int:
    """The reconciler's part: new certificates for instances whose own expires within RENEW_BEFORE.
    A running server takes it at once where its backend can reload it, else at its next restart.
    Returns how many were renewed."""
    # Not while a worker acts on it (a start would write the certificate it read before): next pass.
    due = Instance.objects.filter(tls_expires_at__lt=now + RENEW_BEFORE, status__in=(Status.RUNNING, Status.STOPPED))
    renewed = 0
    for instance in due:
        if not wants_tls(instance):
            continue
        issue(instance, now=now)
        renewed += 1
        if instance.status == Status.RUNNING:
            try:
                get_backend(instance.backend).reload_tls(instance)
            except Exception:  # the next restart takes it
                logger.exception("Instance %s: the server did not reload its new certificate", instance.pk)
    return renewed


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
