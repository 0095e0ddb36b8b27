"""Which certificate a box must present before a client sends it anything (its token included).

- A fingerprint given (``fingerprint=``, ``LLMOSD_FINGERPRINT``): exactly that certificate.
- A box found by mDNS: the certificate its ``fp=`` record names. The first use records it in the
  known-hosts file under the box's install id (trust on first use, as SSH does with host keys). Later, a
  certificate with the recorded key is a renewal and is accepted (and recorded); one with another key
  is refused, whatever the LAN now advertises.
- A URL given with neither: the system's CAs (a site's own CA), with the usual host-name checks.

The fingerprint is the SHA-256 of the certificate's DER, hex, the same as ``fp=`` in the TXT records,
``llmosd cert show`` and ``openssl x509 -noout -fingerprint -sha256``."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from llmosd.atomic import replace_file
from llmosd.client.errors import ConnectionFailed
from llmosd.client.target import Target
from llmosd.tls.certs import Certificate, fingerprint, from_der


class CertificateRefused(ConnectionFailed):
    """The box presented a certificate other than the one it is pinned to; nothing was sent to it."""


def normal(value: str) -> str:
    """A fingerprint as 64 lower-case hex digits (``AB:CD:...`` from openssl is accepted)."""
    fp = value.replace(":", "").strip().lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"a certificate fingerprint is 64 hex digits (SHA-256), got {value!r}")
    return fp


def known_hosts_path() -> Path:
    if env := os.environ.get("LLMOSD_KNOWN_HOSTS"):
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "llmosd" / "known_hosts"


@dataclass(frozen=True)
class Known:
    fingerprint: str
    key_pin: str


class KnownHosts:
    """``id:<install id> <fingerprint> <key pin>`` a line; blank lines and ``#`` comments are kept."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or known_hosts_path()

    def _lines(self) -> list[str]:
        try:
            return self.path.read_text().splitlines()
        except FileNotFoundError:
            return []

    def get(self, name: str) -> Known | None:
        for line in self._lines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == name:
                return Known(parts[1], parts[2])
        return None

    def put(self, name: str, cert: Certificate) -> None:
        kept = [line for line in self._lines() if line.split()[:1] != [name]]
        kept.append(f"{name} {cert.fingerprint} {cert.key_pin}")
        replace_file(self.path, "\n".join(kept) + "\n")  # fingerprints are public: 0644, as SSH's


def unverified() -> ssl.SSLContext:
    """Only to read what a box presents: the pin is the check, made before a byte is sent."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def presented(host: str, port: int, timeout: float) -> bytes:
    """The DER certificate the box at host:port presents."""
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        unverified().wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise CertificateRefused(f"{host}:{port} presented no certificate")
    return der


async def presented_async(host: str, port: int, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        _, writer = await asyncio.open_connection(host, port, ssl=unverified(), server_hostname=host)
    try:
        tls = writer.get_extra_info("ssl_object")
        der = tls.getpeercert(binary_form=True) if tls is not None else None
    finally:
        writer.close()
    if not der:
        raise CertificateRefused(f"{host}:{port} presented no certificate")
    return bytes(der)


def settle(der: bytes, target: Target, pinned: str | None, known: KnownHosts) -> str | None:
    """The fingerprint the connections to ``target`` are held to, given the certificate it presents now;
    None: no pin applies (verify with the system's CAs). CertificateRefused when it must not be trusted."""
    got = from_der(der)
    where = target.where
    if pinned:
        if got.fingerprint != normal(pinned):
            raise CertificateRefused(
                f"{where} presented the certificate {got.fingerprint}, not the pinned {normal(pinned)}; "
                "nothing was sent"
            )
        return got.fingerprint
    box = target.appliance
    if box is None or not box.id:
        return None
    name = f"id:{box.id}"
    seen = known.get(name)
    if seen is not None:
        if got.fingerprint == seen.fingerprint:
            return got.fingerprint
        if got.key_pin == seen.key_pin:  # the box renewed its certificate with the key it had
            known.put(name, got)
            return got.fingerprint
        raise CertificateRefused(
            f"{where} ({box.name}) presented the certificate {got.fingerprint} with a key other than the one "
            f"recorded at first use ({seen.fingerprint}, {known.path}, {name}); nothing was sent. If the box was "
            "reinstalled, delete that line; if not, something else may be answering in its name"
        )
    if not box.fingerprint:
        return None
    if got.fingerprint != box.fingerprint:
        raise CertificateRefused(
            f"{where} ({box.name}) presented the certificate {got.fingerprint}, but its mDNS record names "
            f"{box.fingerprint}; nothing was sent"
        )
    known.put(name, got)
    return got.fingerprint


def pinned_context(der: bytes) -> ssl.SSLContext:
    """An SSLContext that trusts this one certificate and nothing else, for clients that take a
    context (``httpx.Client(verify=...)`` under the openai SDK): the pin makes the host-name check moot."""
    pem = ssl.DER_cert_to_PEM_cert(der)
    context = ssl.create_default_context(cadata=pem)
    context.check_hostname = False
    return context


def matches(der: bytes | None, pin: str) -> bool:
    return der is not None and fingerprint(der) == pin


def untrusted(where: str, exc: Exception) -> str:
    return (
        f"{where}: its certificate is not trusted ({getattr(exc, 'verify_message', None) or exc}); "
        "pin it with fingerprint= "
        "(or LLMOSD_FINGERPRINT; `llmosd cert show` on the box prints it), or find the box by mDNS"
    )
