"""Certificates as files: read and check a site's own pair, or make and keep the box's self-signed one.

The self-signed pair lives in ``STATE/tls``: ``key.pem`` (ECDSA P-256, 0600) is made once and kept,
``cert.pem`` is re-made from it when it nears its end or stops naming the box (a new IPv4 address or
host name). Keeping the key lets a client that pinned it (``known_hosts``) accept a renewal, the way
an SSH host key outlives nothing but the box. Only IPv4 addresses trigger a renewal: IPv6 temporary
addresses rotate daily, and a fingerprint that churns with them would break every ``--cacert`` user.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from llmosd.atomic import replace_file

VALID_DAYS = 365
RENEW_DAYS = 30  # renewed when fewer days than this are left
Key = ec.EllipticCurvePrivateKey


class CertError(Exception):
    """A certificate or key that cannot be used, with the reason a person can act on."""


@dataclass(frozen=True)
class Certificate:
    pem: bytes  # the leaf (first) certificate, PEM
    fingerprint: str  # SHA-256 of its DER, hex: what mDNS advertises and clients pin
    key_pin: str  # SHA-256 of its SubjectPublicKeyInfo, hex: the same across renewals with one key
    not_after: dt.datetime
    dns_names: tuple[str, ...]
    addresses: tuple[str, ...]
    self_signed: bool

    def covers(self, dns_names: Sequence[str], addresses: Sequence[str]) -> bool:
        return set(dns_names) <= set(self.dns_names) and set(addresses) <= set(self.addresses)

    def days_left(self, now: dt.datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400

    def as_dict(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "key_pin": self.key_pin,
            "not_after": self.not_after.isoformat(),
            "dns_names": list(self.dns_names),
            "addresses": list(self.addresses),
            "self_signed": self.self_signed,
        }


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def _spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def describe(cert: x509.Certificate) -> Certificate:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(a) for a in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    der = cert.public_bytes(serialization.Encoding.DER)
    return Certificate(
        pem=cert.public_bytes(serialization.Encoding.PEM),
        fingerprint=fingerprint(der),
        key_pin=hashlib.sha256(_spki(cert)).hexdigest(),
        not_after=cert.not_valid_after_utc,
        dns_names=dns,
        addresses=ips,
        self_signed=cert.issuer == cert.subject,
    )


def from_der(der: bytes) -> Certificate:
    return describe(x509.load_der_x509_certificate(der))


def _read_cert(path: Path) -> x509.Certificate:
    try:
        chain = x509.load_pem_x509_certificates(path.read_bytes())
    except OSError as exc:
        raise CertError(f"cannot read the certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise CertError(f"{path} holds no PEM certificate") from None
    return chain[0]


def _read_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertError(f"cannot read the key {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise CertError(f"{path} holds no unencrypted PEM private key") from None


def load_pair(cert_path: Path, key_path: Path, now: dt.datetime | None = None) -> Certificate:
    """A site's own certificate and key, checked to belong together and to be valid now."""
    cert = _read_cert(cert_path)
    key = _read_key(key_path)
    mine = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if mine != _spki(cert):
        raise CertError(f"the key {key_path} is not the key of the certificate {cert_path}")
    described = describe(cert)
    when = now or dt.datetime.now(dt.UTC)
    if described.not_after <= when:
        raise CertError(f"the certificate {cert_path} expired on {described.not_after:%Y-%m-%d}")
    return described


def _key(path: Path) -> Key:
    """The box's key: read, or made on first use."""
    if path.exists():
        key = _read_key(path)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{path} is not an ECDSA key; remove it and a new one is made")
        return key
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    replace_file(path, pem, 0o600)
    return key


def make_certificate(key: Key, dns_names: Sequence[str], addresses: Sequence[str], now: dt.datetime) -> bytes:
    """A self-signed leaf for a TLS server: the names and addresses as SANs, PEM."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, (dns_names[0] if dns_names else "llmosd")[:64]),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmosd"),
        ]
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))  # a client whose clock is a little behind
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digital signature only
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def self_signed(
    directory: Path, dns_names: Sequence[str], addresses: Sequence[str], now: dt.datetime | None = None
) -> tuple[Path, Path, Certificate, bool]:
    """The box's pair in ``directory``: (cert path, key path, the certificate, whether it was made now).
    Made anew when missing, unreadable, not of the key, within RENEW_DAYS of its end, or not naming
    every one of ``dns_names`` and ``addresses``."""
    when = now or dt.datetime.now(dt.UTC)
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    key = _key(key_path)
    try:
        current = load_pair(cert_path, key_path, when)
    except CertError:
        current = None
    if current is not None and current.days_left(when) > RENEW_DAYS and current.covers(dns_names, addresses):
        return cert_path, key_path, current, False
    pem = make_certificate(key, dns_names, addresses, when)
    replace_file(cert_path, pem, 0o644)  # public: `llmosd cert export` and any user may read it
    return cert_path, key_path, describe(x509.load_pem_x509_certificate(pem)), True
