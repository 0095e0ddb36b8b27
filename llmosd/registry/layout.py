"""OCI image-layout archives (a tar of ``oci-layout``, ``index.json`` and ``blobs/sha256/…``) for
air-gapped installs: the same calls as a registry, so push, pull, sign and signature checks work on an
archive unchanged. ``ArchiveWriter`` streams a new tar and renames it into place only when closed whole;
``ArchiveReader`` reads blobs straight out of the tar (no extraction), each hashed while it is copied.
Tags are kept per repository: a manifest put as ``(repo, tag)`` is named ``repo:tag`` in ``index.json``
(``org.opencontainers.image.ref.name``), so one archive carries several models and their signatures."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import IO, Any

from llmosd.registry.client import CHUNK, DigestMismatch, Progress, RegistryError
from llmosd.registry.oci import OCI_MANIFEST, digest_of
from llmosd.store.names import check_digest

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"
LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'
MANIFEST_MAX = 4 << 20


def _blob_name(digest: str) -> str:
    return "blobs/sha256/" + check_digest(digest).removeprefix("sha256:")


def _member(name: str, size: int) -> tarfile.TarInfo:
    """Owner, mode and time fixed: the same models make the same archive bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info


class ArchiveWriter:
    """``async with ArchiveWriter(path) as a``: push/sign into it; ``path`` appears only if it closes
    without an error."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.host = f"archive {path.name}"
        self._part = path.with_name(path.name + ".part")
        self._tar: tarfile.TarFile | None = None
        self._blobs: dict[str, tuple[int, int]] = {}  # digest -> (offset, size) in the tar
        self._manifests: dict[str, bytes] = {}  # digest -> raw
        self._index: dict[str, dict[str, Any]] = {}  # ref name -> descriptor

    async def __aenter__(self) -> ArchiveWriter:
        # both are closed in __aexit__
        self._file = self._part.open("wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        await asyncio.to_thread(self._add_bytes, "oci-layout", LAYOUT)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        assert self._tar is not None
        try:
            if exc_type is None:
                index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": list(self._index.values())}
                await asyncio.to_thread(self._add_bytes, "index.json", json.dumps(index, indent=2).encode())
            await asyncio.to_thread(self._close)
            if exc_type is None:
                os.replace(self._part, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                self._part.unlink()

    def _close(self) -> None:
        assert self._tar is not None
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())  # durable before the rename makes it visible
        finally:
            self._file.close()

    def _add_bytes(self, name: str, data: bytes) -> tarfile.TarInfo:
        assert self._tar is not None
        info = _member(name, len(data))
        self._tar.addfile(info, io.BytesIO(data))
        return info

    def _add_file(self, name: str, src: Path, progress: Progress | None) -> tarfile.TarInfo:
        assert self._tar is not None
        with src.open("rb") as f:
            info = _member(name, os.fstat(f.fileno()).st_size)
            self._tar.addfile(info, _Counting(f, progress))
        return info

    def _read_back(self, digest: str, size: int, dst: Path, progress: Progress | None) -> None:
        offset, stored = self._blobs[digest]
        self._file.flush()
        with self._part.open("rb") as f:
            f.seek(offset)
            _copy_verified(_Limited(f, stored), digest, size, stored, dst, progress, self.host)

    async def get_blob(self, repo: str, digest: str, size: int, dst: Path, progress: Progress | None = None) -> None:
        if digest not in self._blobs:
            raise RegistryError(f"{self.host} has no blob {digest}", 404)
        await asyncio.to_thread(self._read_back, digest, size, dst, progress)

    async def has_blob(self, repo: str, digest: str) -> bool:
        return digest in self._blobs

    async def put_blob(
        self, repo: str, digest: str, src: Path, progress: Progress | None = None, mount_from: str | None = None
    ) -> str:
        if digest in self._blobs:
            return "exists"
        info = await asyncio.to_thread(self._add_file, _blob_name(digest), src, progress)
        self._blobs[digest] = (info.offset_data, info.size)
        return "uploaded"

    async def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str = OCI_MANIFEST) -> str:
        digest = digest_of(raw)
        if digest not in self._blobs:
            info = await asyncio.to_thread(self._add_bytes, _blob_name(digest), raw)
            self._blobs[digest] = (info.offset_data, info.size)
        self._manifests[digest] = raw
        descriptor: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(raw)}
        if artifact_type := json.loads(raw).get("artifactType"):
            descriptor["artifactType"] = artifact_type
        if not ref.startswith("sha256:"):
            descriptor["annotations"] = {REF_NAME: f"{repo}:{ref}"}
            self._index[f"{repo}:{ref}"] = descriptor
        return digest

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        digest = ref if ref.startswith("sha256:") else self._index.get(f"{repo}:{ref}", {}).get("digest", "")
        if digest not in self._manifests:
            raise RegistryError(f"{self.host} has no manifest {ref}", 404)
        return self._manifests[digest], digest


class _Limited:
    """The next ``n`` bytes of a file."""

    def __init__(self, f: IO[bytes], n: int) -> None:
        self.f, self.left = f, n

    def read(self, n: int) -> bytes:
        data = self.f.read(min(n, self.left))
        self.left -= len(data)
        return data


def _copy_verified(
    src: _Limited | IO[bytes], digest: str, size: int, stored: int, dst: Path, progress: Progress | None, host: str
) -> None:
    """Copy a blob into ``dst``, hashing it; DigestMismatch (and no ``dst``) unless it is ``digest``."""
    if stored != size:
        raise DigestMismatch(f"{host}: blob {digest} is {stored} bytes, not {size}; refused")
    sha = hashlib.sha256()
    try:
        with dst.open("wb") as out:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        if "sha256:" + sha.hexdigest() != digest:
            raise DigestMismatch(f"{host}: blob {digest} hashes to sha256:{sha.hexdigest()}; refused")
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


class _Counting:
    """A file that reports what is read of it (tarfile reads the source in chunks)."""

    def __init__(self, f: IO[bytes], progress: Progress | None) -> None:
        self.f, self.progress = f, progress

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if self.progress is not None and data:
            self.progress(len(data))
        return data


class ArchiveReader:
    """An OCI image-layout tar opened for reading; ``with ArchiveReader(path) as a``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.host = f"archive {path.name}"
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 - closed in __exit__
            self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}
            layout = json.loads(self._read("oci-layout", 4096))
            if layout.get("imageLayoutVersion") != "1.0.0":
                raise RegistryError(f"{path}: OCI image layout version {layout.get('imageLayoutVersion')!r}", 400)
            self.index = json.loads(self._read("index.json", MANIFEST_MAX))
        except (tarfile.TarError, ValueError, KeyError, AttributeError) as exc:
            raise RegistryError(f"{path} is not an OCI image-layout archive: {exc}", 400) from None

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *_: object) -> None:
        self._tar.close()

    def _read(self, name: str, limit: int) -> bytes:
        member = self._members.get(name)
        if member is None:
            raise RegistryError(f"{self.path} has no {name}", 404)
        if member.size > limit:
            raise RegistryError(f"{self.path}: {name} is larger than {limit} bytes", 400)
        f = self._tar.extractfile(member)
        assert f is not None
        return f.read()

    def refs(self) -> dict[str, dict[str, Any]]:
        """The tagged manifests: ref name -> descriptor."""
        out = {}
        for d in self.index.get("manifests", []):
            name = (d.get("annotations") or {}).get(REF_NAME)
            if isinstance(name, str):
                out[name] = d
        return out

    async def get_manifest(self, repo: str, ref: str) -> tuple[bytes, str]:
        refs = self.refs()
        found = refs.get(f"{repo}:{ref}") or refs.get(ref) or {}  # a bare tag: another tool's archive
        digest = ref if ref.startswith("sha256:") else str(found.get("digest", ""))
        if not digest:
            raise RegistryError(f"{self.host} has no manifest {ref}", 404)
        raw = await asyncio.to_thread(self._read, _blob_name(digest), MANIFEST_MAX)
        if digest_of(raw) != digest:
            raise DigestMismatch(f"{self.host}: manifest {digest} hashes to {digest_of(raw)}; refused")
        return raw, digest

    async def has_blob(self, repo: str, digest: str) -> bool:
        return _blob_name(digest) in self._members

    async def get_blob(self, repo: str, digest: str, size: int, dst: Path, progress: Progress | None = None) -> None:
        await asyncio.to_thread(self._copy, digest, size, dst, progress)

    def _copy(self, digest: str, size: int, dst: Path, progress: Progress | None) -> None:
        member = self._members.get(_blob_name(digest))
        if member is None:
            raise RegistryError(f"{self.host} has no blob {digest}", 404)
        src = self._tar.extractfile(member)
        assert src is not None
        _copy_verified(src, digest, size, member.size, dst, progress, self.host)
