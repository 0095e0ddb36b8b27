"""Downloading what a pull needs from the Hugging Face hub, with ``huggingface_hub`` (blocking: run it in a
thread). It honours what the library does: ``HF_ENDPOINT``, ``HF_TOKEN``, the hub's cache (``HF_HOME``,
``HF_HUB_CACHE``) and ``HF_HUB_OFFLINE`` (then the files come from the cache alone). Downloads land in the
cache, not the store, and resume there: a pull that fails leaves the store as it was, and the next one
picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmosd.hub.plan import HubRef, UnsupportedRepository, select_files

# (file, its size, bytes of it here so far): called as a file's download moves, from the pulling thread
FileProgress = Callable[[str, int, int], None]
POLL_S = 0.25


class HubError(Exception):
    """A pull that cannot go on; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Fetched:
    folder: Path  # the snapshot folder in the hub's cache
    files: list[str]  # what was taken, relative to it
    commit: str  # the revision's commit
    size: int  # bytes

    def json(self, name: str) -> Any:
        path = self.folder / name
        return json.loads(path.read_text()) if name in self.files and path.is_file() else None


def endpoint() -> str:
    """The hub's address: HF_ENDPOINT as it is now (huggingface_hub reads it once, when it loads)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or constants.ENDPOINT


def fetch(ref: HubRef, progress: FileProgress | None = None) -> Fetched:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return _from_cache(ref)
    info = _info(ref)
    sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
    try:
        files = select_files(sizes, ref.quant)
    except UnsupportedRepository as exc:
        raise HubError(f"{ref}: {exc}", 400) from None
    need = sum(sizes[f] for f in files)
    _check_space(Path(constants.HF_HUB_CACHE), need)
    folder: Path | None = None
    for name in files:
        folder = _download(ref, str(info.sha), name, sizes[name], progress)
    assert folder is not None
    return Fetched(folder, files, str(info.sha), need)


def _info(ref: HubRef) -> Any:
    import requests
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi(endpoint=endpoint()).model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except GatedRepoError:
        raise HubError(
            f"{ref} is gated: accept its terms on huggingface.co, then set HF_TOKEN to a token of that account", 403
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{ref}: the repository has no revision {ref.revision!r}", 404) from None
    except RepositoryNotFoundError:
        raise HubError(f"{ref}: no such repository (or it is private: set HF_TOKEN)", 404) from None
    except HfHubHTTPError as exc:
        raise HubError(f"{ref}: the hub at {endpoint()} answered {_status(exc)}", 502) from None
    except (requests.ConnectionError, requests.Timeout, OSError) as exc:
        raise HubError(f"{ref}: cannot reach the hub at {endpoint()} ({type(exc).__name__})", 502) from None


def _status(exc: Any) -> str:
    response = getattr(exc, "response", None)
    return f"HTTP {response.status_code}" if response is not None else str(exc).splitlines()[0][:200]


def _check_space(cache: Path, need: int) -> None:
    where = cache
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    if need > free:
        raise HubError(f"the download needs {need / 2**30:.1f} GiB; {where} has {free / 2**30:.1f} GiB free", 507)


def _download(ref: HubRef, commit: str, name: str, size: int, progress: FileProgress | None) -> Path:
    """One file into the cache (resumed where a download stopped); the snapshot folder it lies in. While it
    runs, its partial blob's size is reported every POLL_S."""
    import requests
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    out: list[str] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            got = hf_hub_download(
                ref.repo_id, name, revision=commit, endpoint=endpoint(), cache_dir=constants.HF_HUB_CACHE
            )
            out.append(got)
        except BaseException as exc:  # handed to the pulling thread
            failure.append(exc)

    blobs = Path(constants.HF_HUB_CACHE) / f"models--{ref.repo_id.replace('/', '--')}" / "blobs"
    worker = threading.Thread(target=run, name="hub-download", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(POLL_S)
        if progress is not None:
            partial = sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.is_dir() else 0
            progress(name, size, min(partial, size))
    if failure:
        exc = failure[0]
        if isinstance(exc, HfHubHTTPError | requests.RequestException | OSError):
            raise HubError(f"{ref}: downloading {name} failed ({_status(exc)}); pull again to resume", 502) from None
        raise exc
    if progress is not None:
        progress(name, size, size)
    return Path(out[0]).parents[len(Path(name).parts) - 1]


def _from_cache(ref: HubRef) -> Fetched:
    """HF_HUB_OFFLINE: the revision's snapshot in the hub's cache, as huggingface_hub finds it."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        got = snapshot_download(
            ref.repo_id, revision=ref.revision, local_files_only=True, cache_dir=constants.HF_HUB_CACHE
        )
        folder = Path(got)
    except LocalEntryNotFoundError:
        raise HubError(
            f"{ref} is not in the hub's cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set", 404
        ) from None
    listed = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    try:
        files = select_files(listed, ref.quant)
    except UnsupportedRepository as exc:
        raise HubError(f"{ref}: {exc}", 400) from None
    return Fetched(folder, files, folder.name, sum((folder / f).stat().st_size for f in files))
