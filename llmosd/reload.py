"""What a reload (SIGHUP, ``systemctl reload``) may change while the daemon runs. Values the handlers
and loops read afresh take effect at once; those baked into listeners, sessions or the store's place
need a restart, keep their running value, and are named in the log so nobody wonders."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from llmosd.config import Config

BATCHING = frozenset({"max_batch_size", "max_batch_tokens", "batch_run_cost_tokens", "max_queue_delay_ms", "max_queue"})
SYNC = frozenset(
    {
        "subscriptions",
        "sync_interval_s",
        "probation_s",
        "probation_max_error_rate",
        "keep_versions",
        "insecure_registries",
        "registry_ca_file",
        "trust_dir",
        "allow_unsigned_from",
        "peer_cache",
    }
)
ROUTING = frozenset(  # the router's stage reads the secrets and builds the upstreams again
    {"lan_upstreams", "lan_token_file", "openai_upstream_url", "openai_upstream_key_file", "openai_upstream_name"}
)
TLS = frozenset({"tls_cert_file", "tls_key_file"})  # the listener loads the pair again (at every reload too)
# read per request or per pull from the config the handlers see
READ_LIVE = frozenset(
    {
        "log_level",
        "token_file",
        "keep_alive_s",
        "loop_block_ms",
        "pull_bandwidth_mb_s",
        "default_max_tokens",
        "max_inputs",
        "max_input_chars",
        "header_timeout_s",
        "body_timeout_s",
        "body_min_rate_kb_s",
        "write_timeout_s",
        "max_connections_per_client",
        "rate_limit_rps",
        "rate_limit_tokens_per_s",
        "rate_limit_burst_s",
        "metrics_scrape_from",
        "route",
    }
)
LIVE = BATCHING | SYNC | TLS | ROUTING | READ_LIVE


@dataclass(frozen=True)
class Reload:
    config: Config  # what runs from now on: the new values where live, the old ones elsewhere
    applied: tuple[str, ...]  # changed keys that take effect now
    need_restart: tuple[str, ...]  # changed keys that keep their running value until a restart


def reconcile(running: Config, new: Config) -> Reload:
    changed = [f.name for f in fields(Config) if getattr(running, f.name) != getattr(new, f.name)]
    applied = tuple(k for k in changed if k in LIVE)
    need_restart = tuple(k for k in changed if k not in LIVE and k != "config")
    effective = replace(running, **{k: getattr(new, k) for k in applied})
    return Reload(effective, applied, need_restart)
