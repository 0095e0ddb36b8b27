"""The discovery pieces that need no network: TXT records both ways, which addresses are advertised,
the install id, and how a client picks its target."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmosd.client import ConnectionFailed
from llmosd.client.target import Target, local_target, pick
from llmosd.discovery.advertise import install_id, is_loopback, lan_addresses
from llmosd.discovery.txt import MODELS_BYTES, SERVICE_TYPE, Appliance, appliance, models_value, txt_records


def test_txt_records_are_small_versioned_and_read_back() -> None:
    models = [f"model-number-{i:03d}" for i in range(40)]
    txt = txt_records(install_id="ab" * 16, version="0.1.0", auth=True, models=models, devices=["cuda:0", "cuda:1"])
    assert set(txt) == {"api", "id", "ver", "tls", "auth", "models", "dev", "path"}
    assert txt["api"] == "1" and txt["auth"] == "1" and txt["tls"] == "0" and txt["path"] == "/v1"
    assert len(txt["models"].encode()) <= MODELS_BYTES and txt["models"].endswith(",...")
    back = appliance(f"kitchen (2).{SERVICE_TYPE}", ["192.0.2.7"], 11411, "llmosd-abab.local.", txt | {"rev": "3"})
    assert back.name == "kitchen (2)" and back.url == "http://192.0.2.7:11411" and back.revision == 3
    assert back.models_truncated and back.models == tuple(models[: len(back.models)])
    assert back.devices == ("cuda:0", "cuda:1") and back.auth and not back.tls
    assert models_value(["a", "b"]) == "a,b" and models_value([]) == ""


def test_only_reachable_addresses_are_advertised() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and not is_loopback("0.0.0.0")
    assert lan_addresses("127.0.0.1") == []  # clients on the LAN could never reach it
    everything = lan_addresses("0.0.0.0")
    assert all(not a.startswith("127.") for a in everything)
    if everything:  # a specific bind advertises just that address
        assert lan_addresses(everything[0]) == [everything[0]]
    assert lan_addresses("0.0.0.0", ["no-such-interface"]) == []


def test_the_install_id_is_made_once_and_kept(tmp_path: Path) -> None:
    first = install_id(tmp_path)
    assert len(first) == 32 and install_id(tmp_path) == first
    (tmp_path / "id").write_text("garbage\n")  # a damaged id is replaced, not advertised
    assert install_id(tmp_path) not in (first, "garbage")


def box(name: str, id: str) -> Appliance:
    return appliance(f"{name}.{SERVICE_TYPE}", ["192.0.2.1"], 1, "h.local.", {"id": id})


def test_a_client_picks_by_id_then_name_then_the_first_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = [box("zeta", "1" * 32), box("alpha", "2" * 32), box("alpha", "3" * 32)]
    assert pick(found).appliance == found[1]
    assert pick(found, name="zeta").appliance == found[0]
    assert pick(found, id="3" * 32).appliance == found[2]
    with pytest.raises(ConnectionFailed, match=r"no llmosd with name 'nope' found on the LAN \(found: zeta"):
        pick(found, name="nope")
    monkeypatch.setenv("LLMOSD_SOCKET", str(tmp_path / "absent.sock"))
    monkeypatch.delenv("LLMOSD_URL", raising=False)
    assert local_target(None, None) is None  # then the client looks on the LAN
    monkeypatch.setenv("LLMOSD_URL", "box.lan:11411")
    assert local_target(None, None) == Target(url="http://box.lan:11411")
    assert local_target(None, tmp_path / "x.sock") == Target(socket=str(tmp_path / "x.sock"))
