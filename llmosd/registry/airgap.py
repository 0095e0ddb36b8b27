"""Air-gapped installs: models carried on a disk as one OCI image-layout tar. ``export_archive`` writes
store versions (optionally signing them) or copies tags from a registry with their signatures;
``import_archive`` pulls every model in an archive through the same checks as a registry pull (trust
policy, digests, disk space, atomic publication)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llmosd.registry.client import RegistryError, Sink, Source
from llmosd.registry.layout import ArchiveReader, ArchiveWriter
from llmosd.registry.oci import ARTIFACT_TYPE, Reference
from llmosd.registry.signing import Trust, sign, signature_tag, verify
from llmosd.registry.transfer import PullResult, pull, push
from llmosd.store import ModelStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreModel:
    name: str
    version: str | None = None  # None: the active one


@dataclass(frozen=True)
class RegistryModel:
    ref: Reference
    registry: Source


async def copy(src: Source, ref: Reference, dst: Sink, repo: str, tag: str, tmp: Path) -> str:
    """Copy the manifest ``ref`` names (its config and layers) and its signatures from ``src`` to
    ``dst`` as ``repo:tag``; the manifest's digest. Blobs pass through ``tmp`` one at a time."""
    raw, digest = await src.get_manifest(ref.repo, ref.ref)
    await _copy_blobs(src, ref.repo, raw, dst, repo, tmp)
    await dst.put_manifest(repo, tag, raw)
    try:
        sig_raw, _ = await src.get_manifest(ref.repo, signature_tag(digest))
    except RegistryError as exc:
        if exc.status != 404:
            raise
        return digest
    await _copy_blobs(src, ref.repo, sig_raw, dst, repo, tmp)
    await dst.put_manifest(repo, signature_tag(digest), sig_raw)
    return digest


async def _copy_blobs(src: Source, src_repo: str, raw: bytes, dst: Sink, repo: str, tmp: Path) -> None:
    body = json.loads(raw)
    for d in [body["config"], *body.get("layers", [])]:
        digest, size = str(d["digest"]), int(d["size"])
        if await dst.has_blob(repo, digest):
            continue
        path = tmp / digest.removeprefix("sha256:")
        await src.get_blob(src_repo, digest, size, path)
        try:
            await dst.put_blob(repo, digest, path)
        finally:
            path.unlink(missing_ok=True)


async def export_archive(
    store: ModelStore, models: list[StoreModel | RegistryModel], path: Path, key: Ed25519PrivateKey | None = None
) -> list[tuple[str, str]]:
    """Write ``path`` (renamed into place when whole); each model's ``repo:tag`` in it and its digest.
    Store versions go in as ``NAME:VERSION``, signed with ``key`` when given; registry tags keep their
    repository and tag and bring the signatures the registry holds."""
    out = []
    async with ArchiveWriter(path) as archive:
        for m in models:
            with store.tmpdir("archive-") as tmp:
                if isinstance(m, StoreModel):
                    manifest = store.manifest(m.name, m.version)
                    repo, tag = manifest.name, manifest.version
                    ref = Reference(archive.host, repo, tag)
                    digest = (await push(store, repo, tag, ref, archive)).digest
                else:
                    repo, tag = m.ref.repo, m.ref.tag or "latest"
                    digest = await copy(m.registry, m.ref, archive, repo, tag, tmp)
                if key is not None:
                    await sign(archive, repo, digest, key, tmp)
                out.append((f"{repo}:{tag}", digest))
            log.info("archive %s: %s@%s", path.name, out[-1][0], out[-1][1])
    return out


def archive_models(reader: ArchiveReader) -> list[tuple[str, str]]:
    """The (repo, tag) of each llmosd model in an archive (signatures and other artifacts left out)."""
    out = []
    for name, d in sorted(reader.refs().items()):
        if d.get("artifactType", ARTIFACT_TYPE) != ARTIFACT_TYPE:  # signatures, other tools' images
            continue
        repo, sep, tag = name.rpartition(":")
        out.append((repo, tag) if sep else ("", name))
    return out


async def import_archive(
    store: ModelStore, path: Path, trust: Trust | None, *, activate: bool = True
) -> list[PullResult]:
    """Pull every model in the archive into the store; with ``trust``, every one must carry a signature
    by a trusted key (in the archive), checked for all before any is stored."""
    results = []
    with ArchiveReader(path) as reader:
        models = archive_models(reader)
        if not models:
            raise RegistryError(f"{path} holds no llmosd model", 400)
        if trust is not None:
            with store.tmpdir("archive-") as tmp:
                for repo, tag in models:
                    _, digest = await reader.get_manifest(repo, tag)
                    await verify(reader, repo, digest, trust, tmp)
        for repo, tag in models:
            ref = Reference(reader.host, repo, tag)
            results.append(await pull(store, ref, reader, activate=activate, trust=trust))
    return results
