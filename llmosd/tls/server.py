"""The TCP listener's TLS: whether it is on, the one ``SSLContext`` its connections are made from, and
the certificate in that context.

A renewal or a reload calls ``load_cert_chain`` on the same context: OpenSSL copies a context's
certificate into each connection when the connection is made, so handshakes from then on present the
new certificate and connections already open keep theirs; nothing is dropped."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

from llmosd.config import Config, items
from llmosd.discovery.advertise import is_loopback, lan_addresses
from llmosd.tls.certs import CertError, Certificate, load_pair, self_signed

LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def wanted(config: Config, host: str) -> bool:
    """``auto``: on unless the listener is loopback only (no LAN client can reach it)."""
    return config.tls == "on" or (config.tls == "auto" and not is_loopback(host))


def box_names(config: Config) -> list[str]:
    """The DNS names a client may use for the box: its host name, that name and the mDNS name under
    .local, and localhost; each a valid DNS label (an mDNS name with spaces is left out)."""
    host = socket.gethostname().split(".")[0]
    names = [n for n in (host, f"{host}.local") if LABEL.match(n.split(".")[0])]
    if config.mdns_name and LABEL.match(config.mdns_name):
        names.append(f"{config.mdns_name}.local")
    return list(dict.fromkeys([*names, "localhost"]))


def box_addresses(config: Config, host: str) -> list[str]:
    return [*lan_addresses(host, items(config.mdns_interfaces)), "127.0.0.1"]


def certificate_path(config: Config) -> Path:
    """Where the certificate the TCP port presents is kept: the site's file, or the self-signed one's."""
    return (
        Path(config.tls_cert_file) if config.tls_cert_file is not None else Path(config.state_dir) / "tls" / "cert.pem"
    )


class ServerTls:
    def __init__(self) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        self.context = context
        self.certificate: Certificate | None = None
        self.source = ""  # "self-signed (STATE/tls)" or the site's certificate file

    def load(self, config: Config, host: str) -> bool:
        """Load (or make, or renew) the certificate into the context; whether it changed. Blocking:
        run it in a thread. CertError with the reason when it cannot be used (the old one stays)."""
        if config.tls_cert_file is not None and config.tls_key_file is not None:
            cert_path, key_path = Path(config.tls_cert_file), Path(config.tls_key_file)
            cert = load_pair(cert_path, key_path)
            source = str(cert_path)
        else:
            directory = Path(config.state_dir) / "tls"
            names, addresses = box_names(config), box_addresses(config, host)
            cert_path, key_path, cert, _ = self_signed(directory, names, addresses)
            source = f"self-signed ({directory})"
        try:
            self.context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as exc:
            raise CertError(f"the certificate {cert_path} cannot be used: {exc.reason or exc}") from None
        changed = self.certificate is None or self.certificate.fingerprint != cert.fingerprint
        self.certificate, self.source = cert, source
        return changed
