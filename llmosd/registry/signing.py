"""Signed models: an ed25519 signature over the OCI manifest's digest, kept in the registry as a sibling
tag ``sha256-<hex>.sig`` (an OCI artifact whose ``subject`` names the signed manifest, so registries
with the referrers API list it too), and checked against a directory of trusted public keys.

The signed message is the digest string itself (``sha256:<hex>``): whoever holds a trusted key vouches
for exactly those manifest bytes, and through their digests for every file they list."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from llmosd.config import items
from llmosd.registry.client import RegistryError, Sink, Source
from llmosd.registry.oci import EMPTY_BLOB, EMPTY_DIGEST, OCI_MANIFEST, artifact_manifest, digest_of

SIGNATURE_TYPE = "application/vnd.llmosd.signature.v1+json"


class SignatureError(RegistryError):
    """Unsigned, or signed by no trusted key, or a signature that does not verify."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_key(path: Path) -> str:
    """Write a new private key (PEM, 0600) at ``path`` and its public key at ``path.pub``; its id."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = private.public_key()
    pub = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    path.with_name(path.name + ".pub").write_bytes(pub)
    return key_id(public)


def load_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an ed25519 private key")
    return key


@dataclass(frozen=True)
class Trust:
    """The public keys in a trust directory (``*.pub``, PEM), by key id."""

    keys: dict[str, Ed25519PublicKey]
    where: str

    @classmethod
    def load(cls, folder: Path) -> Trust:
        keys = {}
        for path in sorted(folder.glob("*.pub")) if folder.is_dir() else []:
            key = serialization.load_pem_public_key(path.read_bytes())
            if isinstance(key, Ed25519PublicKey):
                keys[key_id(key)] = key
        return cls(keys, str(folder))


def signature_tag(digest: str) -> str:
    return digest.replace(":", "-") + ".sig"


def signature_blob(private: Ed25519PrivateKey, digest: str) -> bytes:
    signature = base64.b64encode(private.sign(digest.encode())).decode()
    body = {"digest": digest, "key_id": key_id(private.public_key()), "alg": "ed25519", "signature": signature}
    return json.dumps(body, sort_keys=True).encode()


async def sign(registry: Sink, repo: str, digest: str, private: Ed25519PrivateKey, tmp: Path) -> str:
    """Push a signature of manifest ``digest`` as ``sha256-<hex>.sig`` (added to those already there)."""
    blobs = await _existing_signatures(registry, repo, digest, tmp)
    new = signature_blob(private, digest)
    blobs = [b for b in blobs if json.loads(b).get("key_id") != key_id(private.public_key())] + [new]
    layers = []
    for i, blob in enumerate(blobs):
        path = tmp / f"sig-{i}"
        path.write_bytes(blob)
        await registry.put_blob(repo, digest_of(blob), path)
        layers.append({"mediaType": SIGNATURE_TYPE, "digest": digest_of(blob), "size": len(blob)})
    (tmp / "config").write_bytes(EMPTY_BLOB)
    await registry.put_blob(repo, EMPTY_DIGEST, tmp / "config")
    manifest_raw, _ = await registry.get_manifest(repo, digest)
    subject = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(manifest_raw)}
    raw = artifact_manifest(SIGNATURE_TYPE, layers, subject=subject)
    return await registry.put_manifest(repo, signature_tag(digest), raw)


async def _existing_signatures(registry: Source, repo: str, digest: str, tmp: Path) -> list[bytes]:
    try:
        raw, _ = await registry.get_manifest(repo, signature_tag(digest))
    except RegistryError as exc:
        if exc.status == 404:
            return []
        raise
    out = []
    for layer in json.loads(raw).get("layers", []):
        if layer.get("mediaType") != SIGNATURE_TYPE or int(layer.get("size", 0)) > 4096:
            continue
        path = tmp / f"signature-{str(layer['digest']).removeprefix('sha256:')}"  # by content: never stale
        await registry.get_blob(repo, layer["digest"], int(layer["size"]), path)
        out.append(path.read_bytes())
    return out


async def verify(registry: Source, repo: str, digest: str, trust: Trust, tmp: Path) -> str:
    """The id of a trusted key whose signature of ``digest`` verifies; SignatureError otherwise."""
    if not trust.keys:
        raise SignatureError(f"no trusted public keys in {trust.where}: cannot check {repo}@{digest}")
    blobs = await _existing_signatures(registry, repo, digest, tmp)
    if not blobs:
        raise SignatureError(f"{registry.host}/{repo}@{digest} is not signed (no {signature_tag(digest)} tag)")
    seen = []
    for blob in blobs:
        try:
            body = json.loads(blob)
            kid, sig = str(body["key_id"]), base64.b64decode(body["signature"])
        except (ValueError, KeyError, TypeError):
            continue
        seen.append(kid)
        key = trust.keys.get(kid)
        if key is None or body.get("digest") != digest:
            continue
        try:
            key.verify(sig, digest.encode())
        except InvalidSignature:
            raise SignatureError(
                f"{registry.host}/{repo}@{digest}: the signature by key {kid} does not verify"
            ) from None
        return kid
    raise SignatureError(
        f"{registry.host}/{repo}@{digest} is signed by {', '.join(seen) or 'nobody'}, "
        f"none of them trusted in {trust.where}"
    )


def trust_policy(trust_dir: Path, allow_unsigned_from: str, host: str) -> Trust | None:
    """The keys a pull from ``host`` must be signed by; None where unsigned models are allowed."""
    allowed = set(items(allow_unsigned_from))
    if "*" in allowed or host in allowed:
        return None
    return Trust.load(trust_dir)
