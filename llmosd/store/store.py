"""The on-disk, content-addressed model store (see DESIGN.md, "The model store is a contract").

Layout under ``root``::

    blobs/sha256/<hex>                       immutable files named by their digest
    models/<name>/<version>/manifest.json    numeric version folders; anything else is ignored
    models/<name>/active -> <version>        symlink, replaced atomically with rename
    tmp/                                     partial work; never read by the server
    profiles/<model-digest>/<device>.json    measured batch profiles (llmosd.store.profiles): cached
                                             facts, pruned with the blobs they describe
    checks/<model-digest>/<cpu-key>.json     the validation gate's short form on this box's CPU kernels,
                                             for artifacts exported on others (cached the same way)

Publishing writes blobs first, then the manifest into a temporary folder that is renamed into place,
then swaps ``active``: a crash at any moment leaves the old or the new version active, never a mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from llmosd.store.digest import sha256_file
from llmosd.store.manifest import FileEntry, Manifest, ManifestError
from llmosd.store.names import check_digest, check_name, check_title, check_version
from llmosd.store.profiles import CHECKS, PROFILES, Profiles

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A store operation that cannot be done (unknown model, bad state)."""


class NotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """A blob whose bytes do not match its manifest; the version must not load."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs" / "sha256"
        self.models = root / "models"
        self.tmp = root / "tmp"
        self.profiles = Profiles(root / PROFILES)
        self.checks = Profiles(root / CHECKS)  # the gate's short form on this box's CPU (scheduler.portable)
        for d in (self.blobs, self.models, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    # ---- paths (every untrusted part validated before it is joined) ----
    def blob_path(self, digest: str) -> Path:
        return self.blobs / check_digest(digest).removeprefix("sha256:")

    def _version_dir(self, name: str, version: str) -> Path:
        return self.models / check_name(name) / check_version(version)

    @contextlib.contextmanager
    def tmpdir(self, prefix: str = "work-") -> Iterator[Path]:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.tmp))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    # ---- reading ----
    def names(self) -> list[str]:
        out = []
        for p in sorted(self.models.iterdir()):
            with contextlib.suppress(ValueError):
                out.append(check_name(p.name))
        return out

    def versions(self, name: str) -> list[str]:
        d = self.models / check_name(name)
        if not d.is_dir():
            return []
        found = [p.name for p in d.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file()]
        return sorted((v for v in found if not v.startswith("0")), key=int)

    def active_version(self, name: str) -> str | None:
        link = self.models / check_name(name) / "active"
        try:
            version = os.readlink(link)
        except OSError:
            return None
        try:
            check_version(version)
        except ValueError:
            return None
        return version if (link.parent / version / "manifest.json").is_file() else None

    def previous_version(self, name: str) -> str | None:
        """The newest version older than the active one (what a rollback activates)."""
        active = self.active_version(name)
        older = [v for v in self.versions(name) if active is not None and int(v) < int(active)]
        return older[-1] if older else None

    def manifest(self, name: str, version: str | None = None) -> Manifest:
        version = version or self.active_version(name)
        if version is None:
            raise NotFound(f"model {name!r} not found (or has no active version)")
        path = self._version_dir(name, version) / "manifest.json"
        try:
            manifest = Manifest.from_json(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"model {name}:{version} not found") from None
        if (manifest.name, manifest.version) != (name, version):
            raise ManifestError(f"{path} describes {manifest.ref}, not {name}:{version}")
        return manifest

    def sampling(self, name: str) -> dict[str, float | int]:
        """Sampling defaults set for a model (``llmosd models set``), over its manifest's: every version."""
        path = self.models / check_name(name) / "settings.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        values = raw.get("sampling") if isinstance(raw, dict) else None
        return {k: v for k, v in values.items() if isinstance(v, int | float)} if isinstance(values, dict) else {}

    def set_sampling(self, name: str, values: dict[str, float | int]) -> None:
        """Replace a model's sampling defaults (checked by the caller), atomically."""
        model_dir = self.models / check_name(name)
        if not self.versions(name):
            raise NotFound(f"model {name!r} not found")
        staging = model_dir / f".settings-{os.getpid()}"
        staging.write_text(json.dumps({"sampling": values}, indent=2, sort_keys=True))
        _fsync_file(staging)
        os.replace(staging, model_dir / "settings.json")
        _fsync_dir(model_dir)

    def verify(self, manifest: Manifest) -> None:
        """Hash every file of a version; raise IntegrityError naming the first file that differs."""
        for entry in manifest.files:
            path = self.blob_path(entry.digest)
            try:
                digest, size = sha256_file(path)
            except FileNotFoundError:
                raise IntegrityError(f"{manifest.ref}: file {entry.path} is missing from the store") from None
            if digest != entry.digest or size != entry.size:
                raise IntegrityError(
                    f"{manifest.ref}: file {entry.path} is corrupt (sha256 {digest} != manifest {entry.digest})"
                )

    def manifest_file(self, digest: str) -> Path | None:
        """The stored manifest.json whose bytes hash to ``digest`` (a peer asking for the manifest layer of
        a version pulled here unchanged), if there is one."""
        wanted = check_digest(digest)
        for name in self.names():
            for version in self.versions(name):
                path = self.models / name / version / "manifest.json"
                if "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == wanted:
                    return path
        return None

    def file_path(self, manifest: Manifest, role: str) -> Path:
        return self.blob_path(manifest.file(role).digest)

    # ---- writing ----
    def add_blob(self, src: Path) -> tuple[str, int]:
        """Move ``src`` (a file under tmp/) into blobs/ under its digest; return (digest, size)."""
        _fsync_file(src)
        digest, size = sha256_file(src)
        dst = self.blob_path(digest)
        if dst.exists():
            src.unlink()
        else:
            os.chmod(src, 0o444)
            os.replace(src, dst)
            _fsync_dir(dst.parent)
        return digest, size

    def next_version(self, name: str) -> str:
        versions = self.versions(name)
        return str(int(versions[-1]) + 1) if versions else "1"

    def publish(self, draft: Manifest, files: Mapping[str, tuple[Path, str]], *, activate: bool = True) -> Manifest:
        """Store ``files`` ({title: (path under tmp/, role)}) and the manifest; optionally activate.

        ``draft.files`` is ignored: entries are computed here from the bytes actually stored.
        """
        name = check_name(draft.name)
        version = check_version(draft.version) if draft.version else self.next_version(name)
        if self._version_dir(name, version).exists():
            raise StoreError(f"{name}:{version} already exists")
        entries = []
        for title, (path, role) in sorted(files.items()):
            digest, size = self.add_blob(path)
            entries.append(FileEntry(check_title(title), digest, size, role))
        manifest = replace(draft, name=name, version=version, files=tuple(entries))
        return self._write_version(manifest, activate)

    def adopt(self, manifest: Manifest, fetched: Mapping[str, Path], *, activate: bool = True) -> Manifest:
        """Publish a version whose files are in blobs/ already or were fetched ({digest: file under tmp/},
        each hashed again as it moves in). Nothing is written unless every file is there."""
        if self._version_dir(manifest.name, manifest.version).exists():
            raise StoreError(f"{manifest.ref} already exists")
        for digest, path in fetched.items():
            got, _ = self.add_blob(path)
            if got != digest:
                self.blob_path(got).unlink(missing_ok=True)
                raise IntegrityError(f"{manifest.ref}: a fetched file hashes to {got}, not {digest}")
        for f in manifest.files:
            path = self.blob_path(f.digest)
            if not path.is_file() or path.stat().st_size != f.size:
                raise IntegrityError(f"{manifest.ref}: file {f.path} is not in the store")
        return self._write_version(manifest, activate)

    def _write_version(self, manifest: Manifest, activate: bool) -> Manifest:
        """The manifest last, by one rename: a version exists whole or not at all."""
        name, version = manifest.name, manifest.version
        Manifest.from_json(manifest.to_json())  # refuse to write what could not be read back
        model_dir = self.models / name
        model_dir.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
        (staging / "manifest.json").write_text(manifest.to_json())
        _fsync_file(staging / "manifest.json")
        os.chmod(staging, 0o755)
        os.rename(staging, model_dir / version)
        _fsync_dir(model_dir)
        if activate:
            self.activate(name, version)
        return manifest

    def activate(self, name: str, version: str) -> None:
        """Point ``active`` at ``version`` with one atomic rename."""
        model_dir = self._version_dir(name, version).parent
        self.manifest(name, version)  # refuses unknown or malformed versions
        tmp_link = model_dir / f".active-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp_link.unlink()
        os.symlink(version, tmp_link)
        os.replace(tmp_link, model_dir / "active")
        _fsync_dir(model_dir)

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Remove one version (or every version) of a model, then unreferenced blobs."""
        model_dir = self.models / check_name(name)
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"model {name!r} not found")
        targets = [check_version(version)] if version else versions
        if version and version not in versions:
            raise NotFound(f"model {name}:{version} not found")
        active = self.active_version(name)
        if version and version == active and len(versions) > 1:
            raise StoreError(f"{name}:{version} is active; activate another version first")
        if active in targets:
            (model_dir / "active").unlink()
        for v in targets:
            shutil.rmtree(model_dir / v)
        if not self.versions(name):
            shutil.rmtree(model_dir)
        self.collect_garbage()
        return targets

    def collect_garbage(self) -> int:
        """Delete blobs no manifest refers to, and the profiles measured on them; return how many blobs."""
        live: set[str] = set()
        for name in self.names():
            for v in self.versions(name):
                with contextlib.suppress(ManifestError, StoreError):
                    live.update(f.digest for f in self.manifest(name, v).files)
        removed = 0
        for blob in self.blobs.iterdir():
            if f"sha256:{blob.name}" not in live:
                blob.unlink()
                removed += 1
        self.profiles.prune(live)
        self.checks.prune(live)
        return removed


STALE_TMP_S = 7 * 24 * 3600  # untouched this long, a folder under tmp/ belongs to nobody


def sweep_tmp(store: ModelStore, older_than_s: float = STALE_TMP_S, now: float | None = None) -> list[str]:
    """Remove folders under tmp/ nothing has written to for ``older_than_s`` (a crashed export, a pull
    abandoned for good); younger ones stay: a running export or a pull to resume may own them."""
    now = time.time() if now is None else now
    removed = []
    for entry in store.tmp.iterdir():
        newest = max([entry.stat().st_mtime, *(p.stat().st_mtime for p in entry.rglob("*"))])
        if now - newest > older_than_s:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry.name)
    if removed:
        log.info("removed %d stale folder(s) from %s: %s", len(removed), store.tmp, removed)
    return removed
