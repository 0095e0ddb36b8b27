"""A store manifest as an OCI artifact and back. Pure functions.

The OCI image manifest has ``artifactType`` ``application/vnd.llmosd.model.v1+json``, the empty config
descriptor, the llmosd manifest itself as its first layer (so a pull restores it byte for byte) and one
layer per file, titled with the file's path. Annotations carry name, version, task and precision so a
registry UI shows them."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from llmosd.store import Manifest, ManifestError
from llmosd.store.names import check_digest, check_title

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ARTIFACT_TYPE = "application/vnd.llmosd.model.v1+json"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
EMPTY_BLOB = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_BLOB).hexdigest()
FILE_TYPE = "application/vnd.llmosd.file.v1"  # + "." + role
TITLE = "org.opencontainers.image.title"
PREFIX = "vnd.llmosd."


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def to_oci(manifest: Manifest, manifest_blob: bytes) -> bytes:
    """The OCI manifest for a store version whose manifest.json is ``manifest_blob``."""
    layers = [
        {
            "mediaType": ARTIFACT_TYPE,
            "digest": digest_of(manifest_blob),
            "size": len(manifest_blob),
            "annotations": {TITLE: "manifest.json"},
        }
    ]
    for f in manifest.files:
        layers.append(
            {
                "mediaType": f"{FILE_TYPE}.{f.role}",
                "digest": f.digest,
                "size": f.size,
                "annotations": {TITLE: f.path, PREFIX + "role": f.role},
            }
        )
    annotations = {
        PREFIX + "name": manifest.name,
        PREFIX + "version": manifest.version,
        PREFIX + "task": manifest.task,
        PREFIX + "precision": manifest.precision,
        "org.opencontainers.image.created": manifest.created or "1970-01-01T00:00:00Z",
    }
    return artifact_manifest(ARTIFACT_TYPE, layers, annotations=annotations)


def artifact_manifest(
    artifact_type: str,
    layers: list[dict[str, Any]],
    annotations: dict[str, str] | None = None,
    subject: dict[str, Any] | None = None,
) -> bytes:
    """An OCI image manifest for an artifact: the empty config, these layers."""
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": EMPTY_TYPE, "digest": EMPTY_DIGEST, "size": len(EMPTY_BLOB)},
        "layers": layers,
    }
    if annotations:
        body["annotations"] = annotations
    if subject:
        body["subject"] = subject
    return json.dumps(body, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    title: str
    media_type: str


@dataclass(frozen=True)
class Artifact:
    """What a pulled OCI manifest says, checked: the llmosd manifest layer and the file layers."""

    manifest_layer: Layer
    files: tuple[Layer, ...]
    annotations: dict[str, str]


def parse_oci(raw: bytes) -> Artifact:
    """Read an OCI manifest that should describe an llmosd model; ManifestError on anything else."""
    try:
        body = json.loads(raw)
        if body.get("artifactType") != ARTIFACT_TYPE and body.get("config", {}).get("mediaType") != ARTIFACT_TYPE:
            raise ManifestError(f"not an llmosd model (artifactType {body.get('artifactType')!r})")
        layers = [
            Layer(check_digest(x["digest"]), int(x["size"]), check_title(x["annotations"][TITLE]), str(x["mediaType"]))
            for x in body["layers"]
        ]
        annotations = {str(k): str(v) for k, v in body.get("annotations", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, ManifestError):
            raise
        raise ManifestError(f"malformed OCI manifest: {exc}") from exc
    heads = [x for x in layers if x.media_type == ARTIFACT_TYPE]
    if len(heads) != 1:
        raise ManifestError("the OCI manifest has no llmosd manifest layer")
    return Artifact(heads[0], tuple(x for x in layers if x is not heads[0]), annotations)


def check_consistent(artifact: Artifact, manifest: Manifest) -> None:
    """Every file the llmosd manifest lists is a layer with the same digest, size and title."""
    layers = {(x.digest, x.size, x.title) for x in artifact.files}
    for f in manifest.files:
        if (f.digest, f.size, f.path) not in layers:
            raise ManifestError(f"{manifest.ref}: file {f.path} ({f.digest}) is not among the artifact's layers")


_REF = re.compile(
    r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?)/"
    r"(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?$"
)


@dataclass(frozen=True)
class Reference:
    host: str  # registry host[:port]
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest when pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return (
            f"{self.host}/{self.repo}"
            + (f":{self.tag}" if self.tag else "")
            + (f"@{self.digest}" if self.digest else "")
        )


def parse_reference(text: str) -> Reference:
    """``REGISTRY/REPO[:TAG][@sha256:…]``; the registry part is required (no implicit Docker Hub)."""
    m = _REF.match(text)
    if not m:
        raise ValueError(
            f"not a registry reference: {text!r} "
            "(expected REGISTRY/REPO[:TAG], such as localhost:5000/models/minilm:stable)"
        )
    return Reference(m["host"], m["repo"], m["tag"] or (None if m["digest"] else "latest"), m["digest"])
