"""Config precedence and validation: flags > environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmosd.config import DEFAULT_PORT, ConfigError, load_config


def test_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 1000\nhost = "0.0.0.0"\nlog_level = "debug"\nstate_dir = "/srv/a"\n')
    env = {"LLMOSD_CONFIG": str(cfg), "LLMOSD_PORT": "2000", "LLMOSD_STATE_DIR": "/srv/b"}
    c = load_config({"port": "3000"}, env)
    assert c.port == 3000  # flag beats env beats file
    assert c.state_dir == Path("/srv/b")  # env beats file
    assert (c.host, c.log_level) == ("0.0.0.0", "debug")  # file beats default
    assert c.token_file == Path("/srv/b/token")
    assert load_config({}, {}).port == DEFAULT_PORT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "unknown config key 'prot'"),
        ('port = "x"\n', "config key 'port'"),
        ("port = 70000\n", "at most 65535"),
        ('log_level = "loud"\n', "config key 'log_level'"),
        ("max_batch_size = 0\n", "config key 'max_batch_size'"),
        ("port = [\n", "not valid TOML"),
        ('metrics_scrape_from = "10.0.0.0/33"\n', "metrics_scrape_from: '10.0.0.0/33'"),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config({"config": str(cfg)}, {})


def test_bad_env_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="LLMOSD_MAX_QUEUE"):
        load_config({}, {"LLMOSD_MAX_QUEUE": "lots"})
    with pytest.raises(ConfigError, match="seed_defaults"):
        load_config({}, {"LLMOSD_SEED_DEFAULTS": "maybe"})


def test_secrets_are_not_in_the_logged_config(tmp_path: Path) -> None:
    c = load_config({"state_dir": str(tmp_path)}, {})
    assert "token" not in " ".join(v for k, v in c.redacted().items() if k != "token_file")


def test_scrape_networks_take_cidrs_and_addresses() -> None:
    import ipaddress

    c = load_config({}, {"LLMOSD_METRICS_SCRAPE_FROM": "10.0.0.7/24, 192.168.1.5,fd00::/8"})
    assert c.scrape_networks == (
        ipaddress.ip_network("10.0.0.0/24"),  # host bits are dropped, as a person writing 10.0.0.7/24 means
        ipaddress.ip_network("192.168.1.5/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert load_config({}, {}).scrape_networks == ()
