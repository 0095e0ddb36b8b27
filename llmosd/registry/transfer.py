"""Push a store version to a registry and pull one into the store.

A pull downloads into ``tmp/pull-<digest>/`` (kept when interrupted, so the next pull resumes each blob
with ``Range``), checks every blob's sha256 while it streams and the free disk space before it starts,
and publishes the version only when every file is there: the manifest is written last, by one rename,
so a killed pull leaves the store as it was."""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from llmosd.registry.client import DigestMismatch, Progress, Registry, RegistryError, Sink, Source
from llmosd.registry.oci import EMPTY_BLOB, EMPTY_DIGEST, Reference, check_consistent, digest_of, parse_oci, to_oci
from llmosd.registry.peers import Peer, fetch
from llmosd.registry.signing import Trust, verify
from llmosd.store import FileEntry, Manifest, ModelStore, StoreError
from llmosd.store.names import check_name

log = logging.getLogger(__name__)

DISK_MARGIN = 256 << 20  # left free after a pull


class NotEnoughSpace(StoreError):
    pass


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    digest: str  # the OCI manifest's
    fetched_bytes: int
    reused: int  # files the store already had
    status: str  # "pulled" or "up to date"
    from_peers: int = 0  # of fetched_bytes, those LAN peers served


LayerProgress = Callable[[str, int, int], Progress]  # (title, size, already have) -> per-chunk callback


@dataclass(frozen=True)
class PushResult:
    digest: str  # the OCI manifest's
    blobs: dict[str, int]  # outcome ("uploaded", "mounted", "exists") -> count


async def push(
    store: ModelStore,
    name: str,
    version: str | None,
    ref: Reference,
    registry: Sink,
    mount_from: str | None = None,
) -> PushResult:
    """Upload a version's files (those the registry lacks: mounted from ``mount_from``, another repository
    of the same registry, where it has them), its manifest and the OCI manifest."""
    manifest = store.manifest(name, version)
    raw = (store.models / manifest.name / manifest.version / "manifest.json").read_bytes()
    with store.tmpdir("push-") as tmp:
        (tmp / "manifest.json").write_bytes(raw)
        (tmp / "config").write_bytes(EMPTY_BLOB)
        uploads = [(EMPTY_DIGEST, tmp / "config"), (digest_of(raw), tmp / "manifest.json")]
        uploads += [(f.digest, store.blob_path(f.digest)) for f in manifest.files]
        outcomes: dict[str, int] = {}
        for digest, path in uploads:
            outcome = await registry.put_blob(ref.repo, digest, path, mount_from=mount_from)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            log.info("push %s: %s %s", ref, digest[:19], outcome)
    digest = await registry.put_manifest(ref.repo, ref.tag or "latest", to_oci(manifest, raw))
    log.info("pushed %s as %s@%s", manifest.ref, ref, digest)
    return PushResult(digest, outcomes)


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


async def pull(
    store: ModelStore,
    ref: Reference,
    registry: Source,
    *,
    name: str | None = None,
    activate: bool = True,
    progress: LayerProgress | None = None,
    free_bytes: Callable[[Path], int] = _free_bytes,
    trust: Trust | None = None,
    peers: Sequence[Peer] = (),
) -> PullResult:
    """Pull ``ref`` into the store. With ``trust``, a manifest no trusted key signed is refused before
    anything is downloaded; None accepts unsigned models (the caller's policy said so)."""
    raw, digest = await registry.get_manifest(ref.repo, ref.ref)
    work = store.tmp / f"pull-{digest.removeprefix('sha256:')[:32]}"
    work.mkdir(exist_ok=True)
    manifest = await _head(registry, ref, raw, digest, work, trust, peers)
    if name is not None:
        manifest = replace(manifest, name=check_name(name))
    same = _same_version(store, manifest)
    if same is not None:
        shutil.rmtree(work, ignore_errors=True)
        if activate and store.active_version(same.name) != same.version:
            store.activate(same.name, same.version)
        return PullResult(same, digest, 0, len(manifest.files), "up to date")
    if (store.models / manifest.name / manifest.version).exists():  # that number holds other bytes here
        manifest = replace(manifest, version=store.next_version(manifest.name))
    missing = {f.digest: f for f in manifest.files if not store.blob_path(f.digest).is_file()}
    _check_space(store, ref, missing.values(), work, free_bytes)
    started = time.monotonic()
    fetched, moved, from_peers = await _blobs(registry, ref, missing, work, progress, peers)
    stored = await asyncio.to_thread(store.adopt, manifest, fetched, activate=activate)  # hashes: off the loop
    shutil.rmtree(work, ignore_errors=True)
    reused = len(manifest.files) - len(missing)
    log.info(
        "pulled %s as %s: %d file(s), %.1f MiB in %.1f s (%d already here)",
        ref,
        stored.ref,
        len(fetched),
        moved / 2**20,
        time.monotonic() - started,
        reused,
    )
    if from_peers:
        log.info("%s: %.1f of %.1f MiB came from LAN peers", ref, from_peers / 2**20, moved / 2**20)
    return PullResult(stored, digest, moved, reused, "pulled", from_peers)


async def _head(
    registry: Source, ref: Reference, raw: bytes, digest: str, work: Path, trust: Trust | None, peers: Sequence[Peer]
) -> Manifest:
    """The llmosd manifest the OCI manifest points at: its signature checked first (with ``trust``), then
    fetched (from a peer if one has it) and checked against the OCI manifest's layers."""
    artifact = parse_oci(raw)
    if trust is not None:
        signer = await verify(registry, ref.repo, digest, trust, work)
        log.info("%s@%s is signed by trusted key %s", ref, digest, signer)
    head = artifact.manifest_layer
    head_path = work / "manifest.json"
    if not await _from_peers(registry, peers, head.digest, head.size, head_path, None):
        await registry.get_blob(ref.repo, head.digest, head.size, head_path)
    manifest = Manifest.from_json(head_path.read_text())
    check_consistent(artifact, manifest)
    return manifest


def _check_space(
    store: ModelStore, ref: Reference, missing: Iterable[FileEntry], work: Path, free_bytes: Callable[[Path], int]
) -> None:
    """Refuse before downloading what the disk cannot hold (what a resumed pull has already counts)."""
    files = list(missing)
    need = sum(f.size for f in files)
    partial = [work / f.digest.removeprefix("sha256:") for f in files]
    have = sum(p.stat().st_size for p in partial if p.exists())
    free = free_bytes(store.root)
    if need - have + DISK_MARGIN > free:
        raise NotEnoughSpace(
            f"pulling {ref} needs {(need - have) / 2**20:,.0f} MiB more and {DISK_MARGIN >> 20} MiB to spare; "
            f"{free / 2**20:,.0f} MiB are free under {store.root}"
        )


async def _blobs(
    registry: Source,
    ref: Reference,
    missing: dict[str, FileEntry],
    work: Path,
    progress: LayerProgress | None,
    peers: Sequence[Peer],
) -> tuple[dict[str, Path], int, int]:
    """Download the missing files into ``work``, smallest first, each resumed where it stopped; (paths by
    digest, bytes moved, of them bytes LAN peers served)."""
    fetched: dict[str, Path] = {}
    moved = from_peers = 0
    for digest, f in sorted(missing.items(), key=lambda kv: kv[1].size):
        dst = work / digest.removeprefix("sha256:")
        already = dst.stat().st_size if dst.exists() else 0
        callback = progress(f.path, f.size, already) if progress else None
        if await _from_peers(registry, peers, digest, f.size, dst, callback):
            from_peers += f.size - already
        else:
            await registry.get_blob(ref.repo, digest, f.size, dst, callback)
        moved += f.size - already
        fetched[digest] = dst
    return fetched, moved, from_peers


async def _from_peers(
    registry: Source, peers: Sequence[Peer], digest: str, size: int, dst: Path, progress: Progress | None
) -> bool:
    """Whether a peer served the blob (verified); the reasons the others did not go to the log."""
    if not isinstance(registry, Registry):  # an archive: nothing to save
        return False
    for peer in peers:
        try:
            await fetch(registry.session, peer, digest, size, dst, progress, registry.throttle)
            return True
        except DigestMismatch as exc:
            log.warning("peer %s sent wrong bytes for %s, skipped: %s", peer, digest[:19], exc)
        except (RegistryError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("peer %s: %s", peer, exc)
    return False


def _same_version(store: ModelStore, manifest: Manifest) -> Manifest | None:
    """The stored version with these exact files, if there is one (a pull that changes nothing)."""
    files = sorted((f.path, f.digest) for f in manifest.files)
    for version in store.versions(manifest.name):
        try:
            local = store.manifest(manifest.name, version)
        except StoreError:
            continue
        if sorted((f.path, f.digest) for f in local.files) == files:
            return local
    return None
