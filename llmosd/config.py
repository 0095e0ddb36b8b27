"""The one typed configuration: defaults < TOML file < LLMOSD_* environment < command-line flags.

Every knob is declared once below with its type, default and a one-line description; the result is a
frozen dataclass validated at start. Errors name the bad key and where it came from.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmosd.routing.policy import RouteTable, parse_routes

DEFAULT_PORT = 11411


class ConfigError(ValueError):
    pass


def _knob(default: Any, help: str, *, choices: tuple[str, ...] = (), secret: bool = False) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "secret": secret})


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def default_state_dir() -> Path:
    if d := os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(d.split(":")[0])
    if _is_root():
        return Path("/var/lib/llmosd")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "llmosd"


SYSTEM_SOCKET = Path("/run/llmosd/llmosd.sock")  # the system service's (llmosd.socket)


def client_socket(configured: Path) -> Path:
    """Where a local client connects: the configured socket if a daemon is there, else the system
    service's (a non-root user's default is under $XDG_RUNTIME_DIR, the service's is not)."""
    if configured.is_socket() or not SYSTEM_SOCKET.is_socket():
        return configured
    return SYSTEM_SOCKET


def default_socket(state_dir: Path) -> Path:
    if d := os.environ.get("RUNTIME_DIRECTORY"):
        return Path(d.split(":")[0]) / "llmosd.sock"
    if _is_root():
        return Path("/run/llmosd/llmosd.sock")
    if d := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(d) / "llmosd" / "llmosd.sock"
    return state_dir / "llmosd.sock"


@dataclass(frozen=True)
class Config:
    config: Path | None = _knob(None, "TOML file read at start (flags and environment override it)")
    state_dir: Path = _knob(None, "model store and access token (default: /var/lib/llmosd as root)")
    socket: Path = _knob(None, "Unix socket path; 'none' disables it (default: /run/llmosd/llmosd.sock)")
    host: str = _knob("127.0.0.1", "TCP address to bind; 'none' disables TCP")
    port: int = _knob(DEFAULT_PORT, "TCP port (0 picks a free one)")
    token_file: Path = _knob(None, "bearer token for non-local clients, created 0600 (default: STATE/token)")
    log_level: str = _knob("info", "logging level", choices=("debug", "info", "warning", "error"))
    device: str = _knob(
        "auto", "execution device: auto (CUDA where it loads), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    threads: int = _knob(0, "ONNX Runtime intra-op threads per model (0: physical cores)")
    ort_spinning: bool = _knob(True, "let ONNX Runtime's idle pool threads spin (lower latency, busier cores)")
    max_batch_size: int = _knob(32, "most inputs run in one batch")
    max_batch_tokens: int = _knob(8192, "most padded tokens in one batch")
    batch_run_cost_tokens: int = _knob(48, "fixed cost of one model run, in tokens of work (higher: fuller batches)")
    max_queue_delay_ms: float = _knob(0.0, "longest wait for a fuller batch when the model is idle")
    max_queue: int = _knob(1024, "inputs waiting per model before requests get 429")
    instances: int = _knob(
        1, "instances of each model per GPU with room for them (Triton's instance count); CPU-only: on the CPU"
    )
    autotune: bool = _knob(True, "measure each model's best batch size on its device (cached under profiles/)")
    latency_budget_ms: float = _knob(
        0.0, "autotune: latency a batch may take (0: by task: 250 ms encoders, 100 ms per decode step)"
    )
    loop_block_ms: float = _knob(100.0, "warn (and count in /metrics) when the event loop is kept this long (0: off)")
    keep_alive_s: float = _knob(300.0, "unload a model loaded on demand after this long idle (negative: never)")
    max_sequences: int = _knob(16, "generation: sequences decoded together per model (continuous batching)")
    kv_cache_mb: int = _knob(1024, "generation: KV-cache memory per model; worst case reserved per sequence")
    prefix_cache_mb: int = _knob(128, "generation: prompts' KV kept for reuse, within what kv_cache_mb leaves (0: off)")
    prefill_chunk_tokens: int = _knob(
        128, "generation: prompt positions run between two decode steps; longer prompts run in chunks of this size"
    )
    context_length: int = _knob(0, "generation: context cap in tokens (0: the model's own)")
    default_max_tokens: int = _knob(1024, "generation: max_tokens when a request names none (OpenAI: to the end)")
    max_body_bytes: int = _knob(8 << 20, "largest request body")
    max_inputs: int = _knob(2048, "most inputs in one request")
    max_input_chars: int = _knob(65536, "longest single input string")
    header_timeout_s: float = _knob(10.0, "time to send a request's headers once its first byte arrived")
    body_timeout_s: float = _knob(10.0, "grace for a request body; past it the body must arrive at body_min_rate_kb_s")
    body_min_rate_kb_s: float = _knob(16.0, "slowest request-body upload accepted after the grace (0: no minimum)")
    keepalive_timeout_s: float = _knob(30.0, "an idle connection (no request started) is closed after this long")
    write_timeout_s: float = _knob(30.0, "a client that takes none of a response (streams too) this long is dropped")
    tls: str = _knob(
        "auto",
        "TLS on the TCP port: auto (on unless it listens on loopback only), on or off",
        choices=("auto", "on", "off"),
    )
    tls_cert_file: Path | None = _knob(
        None, "the site's own certificate, PEM, its chain after it (default: a self-signed one in STATE/tls)"
    )
    tls_key_file: Path | None = _knob(None, "the key of tls_cert_file, PEM, unencrypted")
    max_connections_per_client: int = _knob(
        256, "open TCP connections one client address may hold; more are refused with 429 (Unix socket: no limit)"
    )
    rate_limit_rps: float = _knob(
        0.0, "requests a second each non-local client (its token, and its address) may make on average (0: no limit)"
    )
    rate_limit_tokens_per_s: float = _knob(
        0.0, "generated tokens a second each non-local client may have on average (0: no limit)"
    )
    rate_limit_burst_s: float = _knob(10.0, "the rate limits' buckets hold this many seconds of their rate")
    metrics_scrape_from: str = _knob(
        "", "networks (comma-separated, e.g. 10.0.0.0/24) whose clients may GET /metrics without a token"
    )
    mdns: bool = _knob(True, "advertise on the LAN over mDNS (_llmosd._tcp) when the TCP listener is not loopback")
    mdns_name: str = _knob("", "mDNS instance name (default: the host name)")
    mdns_interfaces: str = _knob("", "comma-separated interfaces to advertise on (default: every one that is up)")
    insecure_registries: str = _knob(
        "", "registries (comma-separated hosts) spoken to over plain HTTP; loopback always is"
    )
    registry_ca_file: str = _knob("", "a PEM file of CAs trusted for registries besides the system's")
    subscriptions: str = _knob(
        "", "tags to follow, comma-separated REGISTRY/REPO:TAG[=NAME]; new digests are activated"
    )
    sync_interval_s: float = _knob(300.0, "how often each subscription is checked (±10 % jitter; backs off when down)")
    probation_s: float = _knob(
        60.0, "after a sync activates a version, how long health probes and its error rate may roll it back"
    )
    probation_max_error_rate: float = _knob(
        0.05, "the share of real requests that may fail in probation (of at least 10) before a rollback"
    )
    keep_versions: int = _knob(3, "versions a sync keeps per model, the active one included")
    pull_bandwidth_mb_s: float = _knob(
        0.0, "cap on the daemon's registry downloads, MB/s shared by all pulls (0: none)"
    )
    peer_cache: bool = _knob(True, "serve verified blobs to LAN peers and ask them first when pulling")
    trust_dir: Path = _knob(
        None, "public keys (*.pub) whose signatures pulled models must carry (default: STATE/trust)"
    )
    allow_unsigned_from: str = _knob("", "registries (comma-separated hosts, or *) whose unsigned models may be pulled")
    seed_defaults: bool = _knob(True, "export the embedded default models into an empty store on start")
    seed_archive: str = _knob(
        "", "an OCI image-layout tar (models export-archive) the default models are imported from before exporting"
    )
    default_precision: str = _knob(
        "auto",
        "precision of seeded default models (auto: the fastest that passes the quality gate)",
        choices=("auto", "fp32", "int8", "int4"),
    )
    route: str = _knob(
        "local",
        "where requests go: local, prefer-local, prefer-remote or remote; NAME=POLICY items override it per model "
        '(e.g. "prefer-local,gpt-4o-mini=remote"; in TOML also a [route] table with "default")',
    )
    lan_upstreams: bool = _knob(False, "route to the llmosd appliances found on the LAN over mDNS (see route)")
    lan_token_file: Path | None = _knob(
        None, "the token sent to LAN peers: one line (a site token) or NAME TOKEN lines (default: this box's own)"
    )
    openai_upstream_url: str = _knob(
        "", "an OpenAI-compatible base URL to route to, e.g. https://api.openai.com/v1 or http://gpu-box:8000/v1"
    )
    openai_upstream_key_file: Path | None = _knob(None, "a file holding the API key sent to openai_upstream_url")
    openai_upstream_name: str = _knob("", "the upstream's name in X-Llmosd-Route and /metrics (default: its host)")
    debug_api: bool = _knob(
        False, "enable POST /api/debug/block-loop, which blocks the event loop on purpose (to test the watchdog)"
    )
    shutdown_timeout_s: float = _knob(30.0, "how long SIGTERM waits for in-flight requests")

    def __post_init__(self) -> None:
        if self.state_dir is None:
            object.__setattr__(self, "state_dir", default_state_dir())
        if self.socket is None:
            object.__setattr__(self, "socket", default_socket(self.state_dir))
        if self.token_file is None:
            object.__setattr__(self, "token_file", self.state_dir / "token")
        if self.trust_dir is None:
            object.__setattr__(self, "trust_dir", self.state_dir / "trust")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_cert_file and tls_key_file go together: set both, or neither for a self-signed one")
        self.scrape_networks  # noqa: B018 (validates: a bad network stops the start, or a reload keeps the old)
        self.routes  # noqa: B018 (the same)
        if self.openai_upstream_url and not self.openai_upstream_url.startswith(("http://", "https://")):
            url = self.openai_upstream_url
            raise ConfigError(f"openai_upstream_url: expected an http:// or https:// URL (got {url!r})")

    @functools.cached_property  # read per request by the routing middleware: parsed once per config
    def routes(self) -> RouteTable:
        try:
            return parse_routes(self.route)
        except ValueError as exc:
            raise ConfigError(f"route: {exc}") from None

    @property
    def scrape_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(n, strict=False) for n in items(self.metrics_scrape_from))
        except ValueError as exc:
            raise ConfigError(f"metrics_scrape_from: {exc}") from None

    @property
    def socket_enabled(self) -> bool:
        return str(self.socket).lower() != "none"

    @property
    def tcp_enabled(self) -> bool:
        return self.host.lower() != "none"

    def redacted(self) -> dict[str, str]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = "<redacted>" if f.metadata.get("secret") else str(value)
        return out


def items(value: str) -> list[str]:
    """A comma-separated config value as its non-empty, stripped items."""
    return [x.strip() for x in value.split(",") if x.strip()]


def route_items(table: Mapping[str, Any], origin: str) -> str:
    """A TOML [route] table as the knob's string form ("DEFAULT,NAME=POLICY,...")."""
    if not all(isinstance(v, str) for v in table.values()):
        raise ConfigError(f"config key 'route' from {origin}: every value of the [route] table is a policy string")
    rest = [f"{k}={v}" for k, v in table.items() if k != "default"]
    return ",".join([table["default"], *rest] if "default" in table else rest)


def knobs() -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(Config))


def env_name(key: str) -> str:
    return f"LLMOSD_{key.upper()}"


def _kind(f: dataclasses.Field[Any]) -> type:
    t = str(f.type)
    if "Path" in t:
        return Path
    return {"int": int, "float": float, "bool": bool}.get(t, str)


def _coerce(key: str, value: Any, origin: str) -> Any:
    f = {k.name: k for k in knobs()}[key]
    kind = _kind(f)
    try:
        if kind is bool:
            if isinstance(value, bool):
                out: Any = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                out = True
            elif str(value).lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError("expected true or false")
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            out = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            out = float(value)
        elif kind is Path:
            if not isinstance(value, str | Path) or not str(value):
                raise ValueError("expected a path")
            out = Path(value).expanduser()
        else:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            out = value
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key {key!r} from {origin}: {exc} (got {value!r})") from None
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"config key {key!r} from {origin}: must be one of {', '.join(choices)} (got {out!r})")
    if kind in (int, float) and out < 0:
        raise ConfigError(f"config key {key!r} from {origin}: must not be negative (got {out!r})")
    if key == "port" and out > 65535:
        raise ConfigError(f"config key 'port' from {origin}: must be at most 65535 (got {out!r})")
    if (
        key
        in (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue",
            "max_inputs",
            "max_body_bytes",
            "max_connections_per_client",
            "header_timeout_s",
            "keepalive_timeout_s",
            "write_timeout_s",
            "instances",
            "keep_versions",
            "prefill_chunk_tokens",
        )
        and out < 1
    ):
        raise ConfigError(f"config key {key!r} from {origin}: must be at least 1 (got {out!r})")
    return out


def load_config(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Merge the sources; ``flags`` holds only what was given on the command line."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    keys = {f.name for f in knobs()}
    values: dict[str, Any] = {}
    path = flags.get("config") or environ.get(env_name("config"))
    if path is None and (d := environ.get("CONFIGURATION_DIRECTORY")):
        candidate = Path(d.split(":")[0]) / "config.toml"
        path = candidate if candidate.is_file() else None
    if path:
        try:
            data = tomllib.loads(Path(path).expanduser().read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            if key not in keys or key == "config":
                raise ConfigError(f"unknown config key {key!r} in {path}")
            if key == "route" and isinstance(value, dict):  # [route] default = "...", MODEL = "..."
                value = route_items(value, str(path))
            values[key] = _coerce(key, value, str(path))
        values["config"] = Path(path)
    for key in keys:
        if (raw := environ.get(env_name(key))) is not None:
            values[key] = _coerce(key, raw, env_name(key))
    for key, value in flags.items():
        if key not in keys:
            raise ConfigError(f"unknown config key {key!r}")
        values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    return Config(**values)
