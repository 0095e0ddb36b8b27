"""TLS without a LAN: the box's certificate (made, kept, renewed), a site's pair checked, the client's
pinning rules, and a loopback daemon with tls = "on" (plain HTTP refused clearly, a silent connection
closed, the SDK pinned). The same from a client in a network namespace is in test_auth.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import socket
import ssl
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from llmosd.client import AsyncClient, Client, ConnectionFailed
from llmosd.client.pinning import CertificateRefused, KnownHosts, settle
from llmosd.client.target import Target
from llmosd.config import ConfigError, load_config
from llmosd.discovery.txt import SERVICE_TYPE, Appliance, appliance, txt_records
from llmosd.tls.certs import RENEW_DAYS, VALID_DAYS, CertError, load_pair, make_certificate, self_signed
from tests.conftest import llmosd, start_daemon

NAMES, ADDRESSES = ["box", "box.local", "localhost"], ["192.0.2.10", "127.0.0.1"]
NOW = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)


def der_of(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_the_box_makes_its_certificate_once_and_renews_it_with_the_same_key(tmp_path: Path) -> None:
    cert_path, key_path, cert, made = self_signed(tmp_path / "tls", NAMES, ADDRESSES, NOW)
    assert made and cert.self_signed and cert.fingerprint == hashlib.sha256(der_of(cert.pem)).hexdigest()
    assert key_path.stat().st_mode & 0o777 == 0o600 and cert_path.stat().st_mode & 0o077 == 0o044
    assert set(cert.dns_names) == set(NAMES) and set(cert.addresses) == set(ADDRESSES)
    assert cert.not_after == NOW + dt.timedelta(days=VALID_DAYS)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_path, key_path)  # what the listener does with them

    _, _, again, made = self_signed(tmp_path / "tls", NAMES, ADDRESSES, NOW + dt.timedelta(days=300))
    assert not made and again == cert  # nothing changed: the same certificate, so the same pin

    late = NOW + dt.timedelta(days=VALID_DAYS - RENEW_DAYS + 1)
    _, _, renewed, made = self_signed(tmp_path / "tls", NAMES, ADDRESSES, late)
    assert made and renewed.key_pin == cert.key_pin and renewed.fingerprint != cert.fingerprint
    assert renewed.not_after == late + dt.timedelta(days=VALID_DAYS)

    _, _, moved, made = self_signed(tmp_path / "tls", NAMES, [*ADDRESSES, "192.0.2.99"], late)
    assert made and "192.0.2.99" in moved.addresses and moved.key_pin == cert.key_pin  # a new DHCP address

    cert_path.write_text("garbage\n")
    _, _, remade, made = self_signed(tmp_path / "tls", NAMES, ADDRESSES, late)
    assert made and remade.key_pin == cert.key_pin


def test_a_sites_pair_is_checked_before_it_is_used(tmp_path: Path) -> None:
    mine = ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / "cert.pem"
    cert.write_bytes(make_certificate(mine, ["site.example"], [], NOW))
    _, key_path, _, _ = self_signed(tmp_path / "other", NAMES, ADDRESSES, NOW)  # a key that is not cert's
    with pytest.raises(CertError, match=f"the key {key_path} is not the key of the certificate {cert}"):
        load_pair(cert, key_path, NOW)
    pkcs8, pem = serialization.PrivateFormat.PKCS8, serialization.Encoding.PEM
    own_key = tmp_path / "key.pem"
    own_key.write_bytes(mine.private_bytes(pem, pkcs8, serialization.NoEncryption()))
    assert load_pair(cert, own_key, NOW).dns_names == ("site.example",)
    cert.write_bytes(make_certificate(mine, ["site.example"], [], NOW - dt.timedelta(days=VALID_DAYS + 1)))
    with pytest.raises(CertError, match="expired on"):
        load_pair(cert, own_key, NOW)
    with pytest.raises(CertError, match="cannot read the certificate"):
        load_pair(tmp_path / "absent.pem", key_path, NOW)
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_config({"tls_cert_file": str(cert)}, environ={})
    with pytest.raises(ConfigError, match="must be one of auto, on, off"):
        load_config({"tls": "maybe"}, environ={})


def box(fp: str = "", id: str = "ab" * 16) -> Target:
    a = Appliance("kitchen", id, ("192.0.2.10",), 11411, "0.1", "1", (), False, (), True, True, "/v1", "k.local.")
    return Target(url="https://192.0.2.10:11411", appliance=Appliance(**{**a.__dict__, "fingerprint": fp}))


def test_pins_trust_on_first_use_accept_a_renewal_and_refuse_another_key(tmp_path: Path) -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    first = der_of(make_certificate(key, NAMES, ADDRESSES, NOW))
    renewal = der_of(make_certificate(key, NAMES, ADDRESSES, NOW + dt.timedelta(days=340)))
    impostor = der_of(make_certificate(other, NAMES, ADDRESSES, NOW))
    fp = hashlib.sha256(first).hexdigest()
    known = KnownHosts(tmp_path / "known_hosts")

    with pytest.raises(CertificateRefused, match="but its mDNS record names"):
        settle(impostor, box(fp), None, known)  # a record and a certificate that disagree: nothing recorded
    assert not known.path.exists()
    assert settle(first, box(fp), None, known) == fp  # first use: recorded
    assert known.path.read_text().split()[:2] == [f"id:{'ab' * 16}", fp]
    renewed_fp = hashlib.sha256(renewal).hexdigest()
    assert settle(renewal, box(fp), None, known) == renewed_fp  # stale record, same key: a renewal
    assert known.get(f"id:{'ab' * 16}").fingerprint == renewed_fp  # type: ignore[union-attr]
    impostor_fp = hashlib.sha256(impostor).hexdigest()
    with pytest.raises(CertificateRefused, match="with a key other than the one recorded at first use"):
        settle(impostor, box(impostor_fp), None, known)  # even when the LAN now advertises the impostor
    assert settle(impostor, box(impostor_fp, id="cd" * 16), None, known) == impostor_fp  # another box

    url = Target(url="https://192.0.2.10:11411")
    assert settle(first, url, None, known) is None  # no pin: the system's CAs decide
    assert settle(first, url, fp.upper(), known) == fp
    with pytest.raises(CertificateRefused, match=f"not the pinned {impostor_fp}; nothing was sent"):
        settle(first, url, impostor_fp, known)
    with pytest.raises(ValueError, match="64 hex digits"):
        settle(first, url, "abc", known)


def test_the_txt_records_carry_the_fingerprint_only_when_tls_is_on() -> None:
    fp = "0f" * 32
    txt = txt_records(install_id="ab" * 16, version="0.1", auth=True, models=["m"], devices=["cpu"], fingerprint=fp)
    assert txt["tls"] == "1" and txt["fp"] == fp
    back = appliance(f"box.{SERVICE_TYPE}", ["192.0.2.7"], 11411, "box.local.", txt)
    assert back.tls and back.fingerprint == fp and back.url == "https://192.0.2.7:11411"
    assert appliance(f"box.{SERVICE_TYPE}", [], 1, "b.", txt | {"fp": "zz" * 32}).fingerprint == ""
    plain = txt_records(install_id="ab" * 16, version="0.1", auth=True, models=[], devices=[])
    assert plain["tls"] == "0" and "fp" not in plain


def test_a_tls_port_refuses_plain_http_clearly_and_serves_pinned_clients(tmp_path: Path) -> None:
    env = {"LLMOSD_SEED_DEFAULTS": "false", "LLMOSD_TLS": "on", "LLMOSD_HEADER_TIMEOUT_S": "1"}
    d = start_daemon(tmp_path / "state", tmp_path, env=env, until="/healthz")
    try:
        shown = llmosd("cert", "show", "--json", "--state-dir", str(d.state_dir))
        fp = json.loads(shown.stdout)["fingerprint"]
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as plain:
            plain.sendall(b"GET /v1/models HTTP/1.1\r\nHost: box\r\n\r\n")
            answer = b""
            while chunk := plain.recv(65536):
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 Bad Request") and json.loads(body)["error"]["type"] == "tls_required"
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed after header_timeout_s, not held open
            assert 0.5 < time.monotonic() - started < 5
        url = f"https://127.0.0.1:{d.port}"
        assert Client(url, fingerprint=fp).models() == []
        with pytest.raises(ConnectionFailed, match="its certificate is not trusted"):
            Client(url).models()

        async def pinned() -> list[object]:
            async with AsyncClient(url, fingerprint=fp) as client:
                return await client.models()

        import asyncio

        assert asyncio.run(pinned()) == []
        exported = llmosd("cert", "export", "--state-dir", str(d.state_dir)).stdout
        assert hashlib.sha256(der_of(exported.encode())).hexdigest() == fp
    finally:
        assert d.stop() == 0
    assert "TLS on the TCP port: self-signed" in d.log.read_text()
