"""The store contract on real files: publish, activate, integrity, path safety, removal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmosd.store import IntegrityError, InvalidName, Manifest, ModelStore, NotFound, StoreError, TensorSpec


def draft(name: str = "demo", version: str = "") -> Manifest:
    return Manifest(
        name=name,
        version=version,
        task="feature-extraction",
        precision="fp32",
        files=(),
        inputs=(TensorSpec("input_ids", "tensor(int64)", ("batch", "seq")),),
        outputs=(TensorSpec("last_hidden_state", "tensor(float)", ("batch", "seq", 4)),),
        runtime={"max_seq_length": 8, "pooling": "mean", "normalize": True},
    )


def publish(store: ModelStore, payload: bytes, **kw: str) -> Manifest:
    work = store.tmp / f"w{len(os.listdir(store.tmp))}"
    work.mkdir()
    (work / "model.onnx").write_bytes(payload)
    (work / "tokenizer.json").write_bytes(b"{}")
    files = {"model.onnx": (work / "model.onnx", "model"), "tokenizer.json": (work / "tokenizer.json", "tokenizer")}
    return store.publish(draft(**kw), files)


def test_publish_activate_and_read_back(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m1 = publish(store, b"one")
    m2 = publish(store, b"two")
    assert (m1.version, m2.version) == ("1", "2")
    assert store.active_version("demo") == "2"
    assert os.readlink(tmp_path / "models" / "demo" / "active") == "2"
    store.activate("demo", "1")
    assert store.manifest("demo").version == "1"
    blob = store.file_path(m1, "model")
    assert blob.read_bytes() == b"one" and blob.name == m1.file("model").digest.removeprefix("sha256:")
    store.verify(m2)
    assert not list(store.tmp.glob("w*/*"))  # files were moved into blobs/


def test_flipped_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    m = publish(store, b"weights" * 100)
    blob = store.file_path(m, "model")
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[10] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=r"file model\.onnx is corrupt"):
        store.verify(m)


@pytest.mark.parametrize("name", ["../etc", "a/b", "/abs", "..", "UPPER", "", "x" * 65, "-lead", "a..b"])
def test_bad_names_never_reach_the_file_system(tmp_path: Path, name: str) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(InvalidName):
        store.manifest(name)
    with pytest.raises(InvalidName):
        publish(store, b"x", name=name)


@pytest.mark.parametrize("version", ["0", "01", "-1", "1.0", "../1", "latest"])
def test_bad_versions_are_refused(tmp_path: Path, version: str) -> None:
    with pytest.raises(InvalidName):
        ModelStore(tmp_path).manifest("demo", version)


def test_half_written_versions_are_ignored(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store, b"one")
    # What a crash mid-publish leaves behind: a staging folder and a version folder with no manifest.
    (tmp_path / "models" / "demo" / ".2-abc").mkdir()
    (tmp_path / "models" / "demo" / "3").mkdir()
    assert store.versions("demo") == ["1"]
    assert store.next_version("demo") == "2"
    with pytest.raises(NotFound):
        store.activate("demo", "3")
    assert store.active_version("demo") == "1"


def test_remove_collects_unreferenced_blobs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    publish(store, b"one")
    publish(store, b"two")
    with pytest.raises(StoreError, match="is active"):
        store.remove("demo", "2")
    assert store.remove("demo", "1") == ["1"]
    blobs = {p.read_bytes() for p in store.blobs.iterdir()}
    assert blobs == {b"two", b"{}"}
    store.remove("demo")
    assert store.names() == [] and list(store.blobs.iterdir()) == []


def test_profiles_are_part_of_the_store_and_go_with_their_blobs(tmp_path: Path) -> None:
    """profiles/<model-digest>/<device>.json: written atomically, refused for names that are not digests
    or devices, and pruned once no version holds the files they were measured on."""
    store = ModelStore(tmp_path)
    one, two = (next(f.digest for f in publish(store, p).files if f.role == "model") for p in (b"one", b"two"))
    store.profiles.put(one, "cpu", {"chosen": 8})
    store.profiles.put(f"{two}+{one}", "cuda:0", {"chosen": 16})  # a graph and its weights, joined
    store.profiles.put(two, "cpu", {"chosen": 4})
    assert store.profiles.get(one, "cpu") == {"chosen": 8} and store.profiles.get(two, "cuda:1") is None
    assert (tmp_path / "profiles" / one.replace(":", "-") / "cpu.json").is_file()
    for digest, device in (("../../etc", "cpu"), (one, "../x"), (one + "+sha256:00", "cpu")):
        with pytest.raises((InvalidName, ValueError)):
            store.profiles.put(digest, device, {})
    store.remove("demo", "1")  # "one" goes, and every profile measured on it
    assert store.profiles.get(one, "cpu") is None and store.profiles.get(f"{two}+{one}", "cuda:0") is None
    assert store.profiles.get(two, "cpu") == {"chosen": 4}
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == [two.replace(":", "-")]
