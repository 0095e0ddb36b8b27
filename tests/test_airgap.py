"""Air-gapped installs: models carried as one OCI image-layout tar (`llmosd models export-archive` /
`import-archive`), through the same trust, digest and atomicity checks as a registry pull."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

from llmosd.registry.layout import REF_NAME
from llmosd.store import ModelStore
from tests.conftest import DEFAULT
from tests.registry import docker_registry
from tests.test_registry import same_files


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "llmosd", "models", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)


def trusting(state: Path, *keys: Path) -> Path:
    (state / "trust").mkdir(parents=True)
    for key in keys:
        (state / "trust" / f"{key.name}.pub").write_bytes(Path(f"{key}.pub").read_bytes())
    return state


def test_a_signed_archive_imports_only_where_its_key_is_trusted(store_dir: Path, tmp_path: Path) -> None:
    for key in ("vendor.key", "stranger.key"):
        assert cli("keygen", str(tmp_path / key)).returncode == 0
    archive = tmp_path / "models.tar"
    r = cli(
        "export-archive",
        DEFAULT,
        "-o",
        str(archive),
        "--key",
        str(tmp_path / "vendor.key"),
        "--state-dir",
        str(store_dir),
    )
    assert r.returncode == 0, r.stderr
    assert f"{DEFAULT}:1@sha256:" in r.stdout and "(signed)" in r.stdout
    assert not (tmp_path / "models.tar.part").exists()

    with tarfile.open(archive) as tar:  # an OCI image layout any OCI tool reads
        names = set(tar.getnames())
        assert {"oci-layout", "index.json"} <= names
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
    refs = {d["annotations"][REF_NAME]: d for d in index["manifests"]}
    model_ref = f"{DEFAULT}:1"
    digest = refs[model_ref]["digest"]
    assert refs[model_ref]["artifactType"] == "application/vnd.llmosd.model.v1+json"
    assert f"{DEFAULT}:{digest.replace(':', '-')}.sig" in refs
    for f in ModelStore(store_dir).manifest(DEFAULT).files:
        assert "blobs/sha256/" + f.digest.removeprefix("sha256:") in names

    keyless = cli("import-archive", str(archive), "--state-dir", str(tmp_path / "keyless"))
    assert keyless.returncode == 2 and "no trusted public keys" in keyless.stderr
    other = trusting(tmp_path / "other", tmp_path / "stranger.key")
    r = cli("import-archive", str(archive), "--state-dir", str(other))
    assert r.returncode == 2 and "none of them trusted" in r.stderr
    assert ModelStore(other).names() == []

    box = trusting(tmp_path / "box", tmp_path / "vendor.key")
    r = cli("import-archive", str(archive), "--state-dir", str(box))
    assert r.returncode == 0, r.stderr
    assert f"{DEFAULT}:1 (pulled" in r.stdout and ": active" in r.stdout
    same_files(ModelStore(store_dir), ModelStore(box), DEFAULT)
    assert ModelStore(box).active_version(DEFAULT) == "1"
    again = cli("import-archive", str(archive), "--state-dir", str(box))
    assert again.returncode == 0 and "(up to date, 0.0 MiB)" in again.stdout
    assert list(ModelStore(box).tmp.iterdir()) == []


def test_the_same_models_make_the_same_archive_and_unsigned_needs_a_switch(store_dir: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    for path in (a, b):
        assert cli("export-archive", DEFAULT, "-o", str(path), "--state-dir", str(store_dir)).returncode == 0
    assert a.read_bytes() == b.read_bytes()  # fixed owners, modes and times: reproducible
    assert cli("keygen", str(tmp_path / "site.key")).returncode == 0
    r = cli("import-archive", str(a), "--state-dir", str(trusting(tmp_path / "box", tmp_path / "site.key")))
    assert r.returncode == 2 and "is not signed" in r.stderr
    r = cli("import-archive", str(a), "--allow-unsigned", "--no-activate", "--state-dir", str(tmp_path / "box"))
    assert r.returncode == 0 and ": stored" in r.stdout, r.stderr
    assert ModelStore(tmp_path / "box").versions(DEFAULT) == ["1"]


def test_a_corrupted_archive_stores_nothing(store_dir: Path, tmp_path: Path) -> None:
    archive = tmp_path / "models.tar"
    assert cli("export-archive", DEFAULT, "-o", str(archive), "--state-dir", str(store_dir)).returncode == 0
    model = ModelStore(store_dir).manifest(DEFAULT).file("model")
    with tarfile.open(archive) as tar:
        offset = tar.getmember("blobs/sha256/" + model.digest.removeprefix("sha256:")).offset_data
    with archive.open("r+b") as f:  # one flipped byte in the middle of the model's blob
        f.seek(offset + model.size // 2)
        byte = f.read(1)
        f.seek(offset + model.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    box = tmp_path / "box"
    r = cli("import-archive", str(archive), "--allow-unsigned", "--state-dir", str(box))
    assert r.returncode == 2 and "hashes to" in r.stderr and "refused" in r.stderr
    store = ModelStore(box)
    assert store.names() == [] and list(store.blobs.iterdir()) == []
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all")
    r = cli("import-archive", str(tmp_path / "junk.tar"), "--allow-unsigned", "--state-dir", str(box))
    assert r.returncode == 2 and "is not an OCI image-layout archive" in r.stderr


def test_a_registry_tag_is_carried_with_its_signature(store_dir: Path, tmp_path: Path) -> None:
    """The connected side copies a signed tag from the registry into an archive (no store needed); the
    box behind the air gap checks the registry-made signature."""
    assert cli("keygen", str(tmp_path / "vendor.key")).returncode == 0
    with docker_registry(tmp_path / "registry") as reg:
        ref = f"{reg.host}/models/minilm:stable"
        env = dict(os.environ, DOCKER_CONFIG=str(tmp_path / "no-docker"))
        assert cli("push", DEFAULT, ref, "--state-dir", str(store_dir), env=env).returncode == 0
        assert cli("sign", ref, "--key", str(tmp_path / "vendor.key"), "--state-dir", str(store_dir)).returncode == 0
        archive = tmp_path / "carried.tar"
        r = cli("export-archive", ref, "-o", str(archive), "--state-dir", str(tmp_path / "empty"), env=env)
        assert r.returncode == 0 and "models/minilm:stable@sha256:" in r.stdout, r.stderr
    box = trusting(tmp_path / "box", tmp_path / "vendor.key")
    r = cli("import-archive", str(archive), "--state-dir", str(box))
    assert r.returncode == 0, r.stderr
    same_files(ModelStore(store_dir), ModelStore(box), DEFAULT)


def test_a_first_start_seeds_the_default_models_from_an_archive(store_dir: Path, tmp_path: Path) -> None:
    """What the .deb does: ``seed_archive`` names an archive of the default models, and an empty store
    gets them from it on first start, without PyTorch or a network."""
    from llmosd.seed import DEFAULT_MODELS
    from tests.conftest import start_daemon, unix_json

    names = [d.name for d in DEFAULT_MODELS]
    archive = tmp_path / "models.tar"
    assert cli("export-archive", *names, "-o", str(archive), "--state-dir", str(store_dir)).returncode == 0
    env = {"LLMOSD_AUTOTUNE": "false", "LLMOSD_SEED_ARCHIVE": str(archive)}
    d = start_daemon(tmp_path / "state", tmp_path, env=env)
    try:
        status = unix_json(d, "/api/status")
        assert status["ready"] and sorted(m["name"] for m in status["models"]) == sorted(names)
    finally:
        assert d.stop() == 0
    log = d.log.read_text()
    assert "first start: importing the default models from" in log and "exporting" not in log
