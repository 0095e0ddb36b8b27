"""The advertisement's content, both ways: TXT records built from what the daemon serves, and an
``Appliance`` read back from a resolved service. Pure functions; nothing here touches the network.

The TXT keys are versioned by ``api`` and kept small (one mDNS packet holds them with room to spare);
``rev`` counts the daemon's updates. Never a token or anything secret: anyone on the LAN reads them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SERVICE_TYPE = "_llmosd._tcp.local."
TXT_API = "1"
MODELS_BYTES = 160  # the models value's budget; the full list is at /v1/models
MORE = ",..."  # ends a truncated models list
HEX = frozenset("0123456789abcdef")


def txt_records(
    *,
    install_id: str,
    version: str,
    auth: bool,
    models: Sequence[str],
    devices: Sequence[str],
    fingerprint: str = "",
) -> dict[str, str]:
    """``fingerprint``: the SHA-256 of the TLS certificate's DER, hex ("" when the port is plain). It is
    public (the certificate is sent to anyone who connects); clients pin it."""
    records = {
        "api": TXT_API,
        "id": install_id,
        "ver": version,
        "tls": "1" if fingerprint else "0",
        "auth": "1" if auth else "0",
        "models": models_value(models),
        "dev": ",".join(devices) or "cpu",
        "path": "/v1",
    }
    return records | ({"fp": fingerprint} if fingerprint else {})


def models_value(models: Sequence[str]) -> str:
    """Comma-separated names within MODELS_BYTES, cut at a whole name and marked when cut."""
    out = ""
    for i, name in enumerate(models):
        candidate = f"{out},{name}" if out else name
        rest = len(models) - i - 1
        if len((candidate + (MORE if rest else "")).encode()) > MODELS_BYTES:
            return out + MORE
        out = candidate
    return out


@dataclass(frozen=True)
class Appliance:
    """One llmosd found on the LAN."""

    name: str  # the instance name, e.g. "kitchen-box" or "kitchen-box (2)" after a rename
    id: str  # stable per install: tells two appliances with one name apart
    addresses: tuple[str, ...]
    port: int
    version: str
    api: str
    models: tuple[str, ...]
    models_truncated: bool  # the full list is at /v1/models
    devices: tuple[str, ...]
    auth: bool  # a bearer token is needed from the LAN
    tls: bool
    path: str
    host: str  # the mDNS host name the addresses belong to
    revision: int = 0  # TXT "rev": bumped by the daemon at every change of the records
    fingerprint: str = ""  # TXT "fp": the SHA-256 of its TLS certificate (DER, hex), which clients pin

    @property
    def url(self) -> str:
        """The base URL of the first address."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        """A base URL per address (IPv6 in brackets); the mDNS host name when no address resolved."""
        scheme = "https" if self.tls else "http"
        hosts = [f"[{a}]" if ":" in a else a for a in self.addresses] or [self.host.rstrip(".")]
        return [f"{scheme}://{h}:{self.port}" for h in hosts]

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "id": self.id,
            "addresses": list(self.addresses),
            "port": self.port,
            "url": self.url,
            "version": self.version,
            "api": self.api,
            "models": list(self.models),
            "models_truncated": self.models_truncated,
            "devices": list(self.devices),
            "auth": self.auth,
            "tls": self.tls,
            "path": self.path,
            "host": self.host,
            "revision": self.revision,
            "fingerprint": self.fingerprint,
        }


def instance_name(service_name: str) -> str:
    """'kitchen-box (2)._llmosd._tcp.local.' -> 'kitchen-box (2)'."""
    return service_name[: -len(SERVICE_TYPE) - 1] if service_name.endswith("." + SERVICE_TYPE) else service_name


def appliance(service_name: str, addresses: Sequence[str], port: int, server: str, txt: Mapping[str, str]) -> Appliance:
    """An Appliance from a resolved service's parts (TXT decoded to str)."""
    raw = txt.get("models", "")
    truncated = raw.endswith(MORE)
    names = raw[: -len(MORE)] if truncated else raw
    return Appliance(
        name=instance_name(service_name),
        id=txt.get("id", ""),
        addresses=tuple(addresses),
        port=port,
        version=txt.get("ver", ""),
        api=txt.get("api", ""),
        models=tuple(n for n in names.split(",") if n),
        models_truncated=truncated,
        devices=tuple(d for d in txt.get("dev", "").split(",") if d),
        auth=txt.get("auth") == "1",
        tls=txt.get("tls") == "1",
        path=txt.get("path", "/v1"),
        host=server,
        revision=int(txt["rev"]) if txt.get("rev", "").isdigit() else 0,
        fingerprint=fp if len(fp := txt.get("fp", "").lower()) == 64 and all(c in HEX for c in fp) else "",
    )
