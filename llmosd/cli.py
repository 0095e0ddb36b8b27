"""``llmosd serve | status | discover | hardware | tune | export | models list|show|rm``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from llmosd import __version__
from llmosd.config import Config, ConfigError, client_socket, knobs, load_config
from llmosd.store.manifest import PRECISIONS

_FLAG_KEYS = ("config", "state_dir", "socket", "host", "port", "log_level", "device")
SERVE_KEYS = tuple(f.name for f in knobs())  # serve takes every knob as a flag; the other commands the above


def _add_config_flags(p: argparse.ArgumentParser, keys: tuple[str, ...] = _FLAG_KEYS) -> None:
    helps = {f.name: f.metadata["help"] for f in knobs()}
    for key in keys:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=helps[key].replace("%", "%%"))


def _config(args: argparse.Namespace, keys: tuple[str, ...] = _FLAG_KEYS) -> Config:
    return load_config({k: getattr(args, k, None) for k in keys})


def cmd_serve(args: argparse.Namespace) -> int:
    from llmosd.daemon import serve

    return asyncio.run(serve(_config(args, SERVE_KEYS), reload_config=lambda: _config(args, SERVE_KEYS)))


def _store(args: argparse.Namespace) -> Any:
    from llmosd.store import ModelStore

    return ModelStore(_config(args).state_dir)


def _split_ref(ref: str) -> tuple[str, str | None]:
    name, _, version = ref.partition(":")
    return name, version or None


def cmd_models_list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = []
    for name in store.names():
        active = store.active_version(name)
        for v in store.versions(name):
            m = store.manifest(name, v)
            size = sum(f.size for f in m.files)
            rows.append((name, v, "*" if v == active else "", m.task, m.precision, f"{size / 1e6:.1f} MB"))
    if args.json:
        keys = ("name", "version", "active", "task", "precision", "size")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=2))
        return 0
    print(f"{'NAME':24} {'VERSION':8} {'ACTIVE':6} {'TASK':20} {'PRECISION':9} SIZE")
    for r in rows:
        print(f"{r[0]:24} {r[1]:8} {r[2]:6} {r[3]:20} {r[4]:9} {r[5]}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    print(_store(args).manifest(name, version).to_json())
    return 0


def cmd_models_set(args: argparse.Namespace) -> int:
    """Default sampling of a model (``KEY=VALUE``; ``KEY=`` unsets): through the daemon, which applies it
    at once, else in the store."""
    from llmosd.runtime.sampling import merge_defaults, parse_number
    from llmosd.store import ModelStore

    changes: dict[str, object] = {}
    for item in args.values:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"models set takes KEY=VALUE (KEY= unsets), e.g. temperature=0.7 (got {item!r})")
        try:
            changes[key] = None if text == "" else parse_number(key, text)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    config = _config(args)
    answer = _via_daemon(config, f"/api/models/{args.name}/sampling", {"sampling": changes})
    if answer is None:
        store = ModelStore(config.state_dir)
        try:
            values = merge_defaults(store.sampling(args.name), changes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        store.set_sampling(args.name, values)
        own = dict(store.manifest(args.name).runtime.get("sampling") or {})
        answer = {"defaults": own | values}
    print(f"{args.name}: " + " ".join(f"{k}={v}" for k, v in sorted(answer["defaults"].items())))
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    name, version = _split_ref(args.ref)
    removed = _store(args).remove(name, version)
    print(f"removed {name} version(s) {', '.join(removed)}")
    return 0


def _registry(config: Config, host: str, session: Any, insecure: bool = False) -> Any:
    """A Registry for ``host``, opened as the daemon opens it (credentials, CA file, insecure hosts)."""
    from llmosd.registry.access import Registries

    return Registries.from_config(config).open(host, session, insecure)


def _versions(config: Config) -> Any:
    """The model-version service without a pool: what the CLI does when no daemon runs."""
    from llmosd.registry.access import Registries
    from llmosd.store import ModelStore
    from llmosd.versions import ModelVersions

    return ModelVersions(ModelStore(config.state_dir), None, lambda: Registries.from_config(config))


def _registry_run(args: argparse.Namespace, host: str, work: Any) -> Any:
    """Run ``work(registry)`` with a session and ``_registry``."""
    import aiohttp

    config = _config(args)

    async def run() -> Any:
        async with aiohttp.ClientSession() as s:
            return await work(_registry(config, host, s, args.insecure))

    return asyncio.run(run())


def cmd_models_push(args: argparse.Namespace) -> int:
    from llmosd.registry import parse_reference, push
    from llmosd.store import ModelStore

    store = ModelStore(_config(args).state_dir)
    name, _, version = args.ref.partition(":")
    target = parse_reference(args.target)
    manifest = store.manifest(name, version or None)
    result = _registry_run(args, target.host, lambda r: push(store, name, manifest.version, target, r))
    blobs = ", ".join(f"{n} {k}" for k, n in sorted(result.blobs.items()))
    print(f"pushed {manifest.ref} to {target}@{result.digest} (blobs: {blobs})")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from llmosd.registry import parse_reference

    config = _config(args)
    source = parse_reference(args.source)
    bars = _ProgressBars() if sys.stderr.isatty() else None
    pulling = _versions(config).pull(
        source, name=args.name, activate=False, progress=bars, insecure=args.insecure, signed=not args.allow_unsigned
    )
    result, _ = asyncio.run(pulling)
    if result.status == "up to date":
        print(f"{source} is up to date: {result.manifest.ref}")
    else:
        mib = result.fetched_bytes / 2**20
        print(
            f"pulled {source} as {result.manifest.ref} ({mib:,.1f} MiB fetched, {result.reused} file(s) already here)"
        )
    if not args.no_activate:  # through the daemon when it runs, so the new version serves at once
        serving = _activate(config, result.manifest.name, result.manifest.version)
        print(f"{result.manifest.ref} is active" + (" and serving" if serving else ""))
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from llmosd.hub import HubError, HubPull, parse_hub_ref, pull
    from llmosd.logs import setup_logging
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    config = _config(args)
    setup_logging(config.log_level)
    try:
        ref = parse_hub_ref(args.ref)
    except ValueError as exc:
        print(f"llmosd pull: {exc}; for an OCI registry: llmosd models pull", file=sys.stderr)
        return 2
    how = HubPull(args.task, args.precision, args.name, activate=False)
    try:
        manifest = asyncio.run(pull(ModelStore(config.state_dir), ref, discover(), how, _HubBar()))
    except HubError as exc:
        print(f"llmosd pull: {exc}", file=sys.stderr)
        return 1
    print(
        f"pulled {ref} as {manifest.ref} ({manifest.precision}): {json.dumps(manifest.validation.get('figures', {}))}"
    )
    if not args.no_activate:  # through the daemon when it runs, so it serves at once
        serving = _activate(config, manifest.name, manifest.version)
        print(f"{manifest.ref} is active" + (" and serving" if serving else ""))
    return 0


class _HubBar:
    """A pull's downloads: one line per file, redrawn in place on a terminal."""

    def __init__(self) -> None:
        self._tty = sys.stderr.isatty()
        self._done: set[str] = set()

    def __call__(self, name: str, size: int, have: int) -> None:
        if name in self._done:
            return
        line = f"{name[:40]:40} {have / 2**20:9.1f}/{size / 2**20:.1f} MiB"
        if have >= size:
            self._done.add(name)
            print(("\r" if self._tty else "") + line, file=sys.stderr, flush=True)
        elif self._tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)


class _ProgressBars:
    """One line per layer on a terminal: bytes, rate, ETA."""

    def __call__(self, title: str, size: int, have: int) -> Any:
        import time

        start, done = time.monotonic(), [have]

        def step(n: int) -> None:
            done[0] += n
            elapsed = max(time.monotonic() - start, 1e-6)
            rate = (done[0] - have) / elapsed
            eta = (size - done[0]) / rate if rate else 0.0
            mib = f"{done[0] / 2**20:8.1f}/{size / 2**20:.1f} MiB"
            line = f"{title[:28]:28} {mib} {rate / 2**20:7.1f} MiB/s ETA {eta:5.0f} s"
            print("\r" + line, end="\n" if done[0] >= size else "", file=sys.stderr, flush=True)

        return step


def cmd_models_keygen(args: argparse.Namespace) -> int:
    from llmosd.registry.signing import generate_key

    path = Path(args.key)
    kid = generate_key(path)
    print(f"key {kid}: private {path} (keep it secret), public {path}.pub")
    print(f"appliances trust it once {path.name}.pub is in their trust directory (trust_dir, default STATE/trust)")
    return 0


def cmd_models_sign(args: argparse.Namespace) -> int:
    from llmosd.registry import parse_reference
    from llmosd.registry.signing import key_id, load_private, sign
    from llmosd.store import ModelStore

    target = parse_reference(args.target)
    private = load_private(Path(args.key))
    store = ModelStore(_config(args).state_dir)

    async def work(r: Any) -> str:
        _, digest = await r.get_manifest(target.repo, target.ref)
        with store.tmpdir("sign-") as tmp:
            await sign(r, target.repo, digest, private, tmp)
        return str(digest)

    digest = _registry_run(args, target.host, work)
    print(f"signed {target}@{digest} with key {key_id(private.public_key())}")
    return 0


def _via_daemon(config: Config, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """POST to the running daemon over its socket; None when no daemon answers there."""
    import aiohttp

    async def post() -> Any:
        connector = aiohttp.UnixConnector(path=str(client_socket(Path(config.socket))))
        async with aiohttp.ClientSession(connector=connector) as s, s.post(f"http://llmosd{path}", json=body) as r:
            answer = await r.json()
            if r.status != 200:
                raise SystemExit(f"llmosd: {answer['error']['message']}")
            return answer

    try:
        return dict(asyncio.run(post()))
    except (aiohttp.ClientError, OSError):
        return None


def _activate(config: Config, name: str, version: str) -> bool:
    """Through the daemon (which then serves it, the old version draining), else in the store; whether
    it is being served."""
    answer = _via_daemon(config, f"/api/models/{name}/activate", {"version": version})
    if answer is None:
        asyncio.run(_versions(config).activate(name, version))
        return False
    return bool(answer.get("serving"))


def cmd_models_activate(args: argparse.Namespace) -> int:
    serving = _activate(_config(args), args.name, args.version)
    print(f"{args.name}:{args.version} is active" + (" and serving" if serving else ""))
    return 0


def _models_from(config: Config, sources: list[str], session: Any) -> list[Any]:
    """``NAME[:VERSION]`` from the store, or ``REGISTRY/REPO:TAG`` (copied with its signatures)."""
    from llmosd.registry import parse_reference
    from llmosd.registry.airgap import RegistryModel, StoreModel

    out: list[Any] = []
    for text in sources:
        if "/" in text:
            ref = parse_reference(text)
            out.append(RegistryModel(ref, _registry(config, ref.host, session)))
        else:
            name, _, version = text.partition(":")
            out.append(StoreModel(name, version or None))
    return out


def cmd_models_export_archive(args: argparse.Namespace) -> int:
    import aiohttp

    from llmosd.registry.airgap import export_archive
    from llmosd.registry.signing import load_private
    from llmosd.store import ModelStore

    config = _config(args)
    key = load_private(Path(args.key)) if args.key else None

    async def run() -> list[tuple[str, str]]:
        async with aiohttp.ClientSession() as s:
            models = _models_from(config, args.sources, s)
            return await export_archive(ModelStore(config.state_dir), models, Path(args.output), key)

    written = asyncio.run(run())
    for ref, digest in written:
        print(f"{ref}@{digest}" + (" (signed)" if key else ""))
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output}: {len(written)} model(s), {size / 2**20:,.1f} MiB")
    return 0


def cmd_models_import_archive(args: argparse.Namespace) -> int:
    from llmosd.registry.access import Registries
    from llmosd.registry.airgap import import_archive
    from llmosd.store import ModelStore

    config = _config(args)
    trust = None if args.allow_unsigned else Registries.from_config(config).trust("archive")
    results = asyncio.run(import_archive(ModelStore(config.state_dir), Path(args.archive), trust, activate=False))
    for r in results:
        serving = False if args.no_activate else _activate(config, r.manifest.name, r.manifest.version)
        what = "stored" if args.no_activate else "active" + (" and serving" if serving else "")
        print(f"{r.manifest.ref} ({r.status}, {r.fetched_bytes / 2**20:,.1f} MiB): {what}")
    return 0


def cmd_models_rollback(args: argparse.Namespace) -> int:
    config = _config(args)
    answer = _via_daemon(config, f"/api/models/{args.name}/rollback", {})
    if answer is None:
        done = asyncio.run(_versions(config).rollback(args.name))
        answer = {"name": args.name, "version": done.manifest.version, "serving": False}
    print(f"rolled back {answer['name']} to version {answer['version']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from llmosd.export import export_model
    from llmosd.logs import setup_logging
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    config = _config(args)
    setup_logging(config.log_level)
    tasks = discover()
    if args.task not in tasks.exportable():
        print(
            f"llmosd export: unknown task {args.task!r}; choose from {', '.join(tasks.exportable())}", file=sys.stderr
        )
        return 2
    manifest = asyncio.run(
        export_model(
            ModelStore(config.state_dir),
            Path(args.src),
            task=tasks[args.task],
            precision=args.precision,
            name=args.name,
            version=args.version,
            activate=not args.no_activate,
            tolerances=dict(_tolerance(t) for t in args.tolerance),
            exporter=args.exporter,
            options=dict(_option(o) for o in args.option),
            sampling=_sampling(args.sampling),
        )
    )
    print(f"stored {manifest.ref}: {json.dumps(manifest.validation.get('figures', {}))}")
    return 0


def _sampling(items: list[str]) -> dict[str, float | int]:
    """``KEY=VALUE`` sampling defaults, checked here so that a typo fails before an export runs."""
    from llmosd.runtime.sampling import check_defaults, parse_number

    try:
        return check_defaults({key: parse_number(key, value) for key, value in map(_option, items)})
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _option(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--option takes KEY=VALUE, e.g. int4_block_size=16 (got {item!r})")
    return key, value


def _tolerance(item: str) -> tuple[str, float]:
    key, sep, value = item.partition("=")
    try:
        if not sep:
            raise ValueError
        return key, float(value)
    except ValueError:
        raise ConfigError(f"--tolerance takes KEY=NUMBER, e.g. min_cosine=0.999 (got {item!r})") from None


def cmd_status(args: argparse.Namespace) -> int:
    import aiohttp

    config = _config(args)

    async def fetch() -> Any:
        connector = aiohttp.UnixConnector(path=str(client_socket(Path(config.socket))))
        async with aiohttp.ClientSession(connector=connector) as s, s.get("http://llmosd/api/status") as r:
            return await r.json()

    try:
        status = asyncio.run(fetch())
    except (aiohttp.ClientError, OSError) as exc:
        print(f"llmosd is not answering on {config.socket}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"llmosd {status['version']}: {status['status']} (ready: {status['ready']}, pid {status['pid']}, "
        f"rss {status['rss_bytes'] / 1e6:.0f} MB)"
    )
    print("listening on " + ", ".join(status["listeners"]))
    for m in status["models"]:
        print(f"  {m['name']}:{m['version']} {m['task']} {m['precision']} on {', '.join(m['devices'])}")
        for n, i in enumerate(m["instances"]):
            head = f"    #{n} {i['device']}: "
            if "generation" in i:
                g = i["generation"]
                print(
                    f"{head}{g['requests']} requests, {g['running']} running, {g['waiting']} waiting, "
                    f"{g['decode_tokens']} tokens decoded"
                )
            else:
                b = i["batcher"]
                print(f"{head}{b['requests']} requests, {b['batches']} batches, queue {i['queued']}")
    return 0


def cmd_hardware(args: argparse.Namespace) -> int:
    """What the probe sees on this box (no daemon needed), like nvidia-smi for llmosd."""
    from llmosd.hardware import probe

    hw = probe()
    if args.json:
        print(json.dumps(hw.as_dict(), indent=2))
        return 0
    cpu = hw.cpu
    print(f"CPU: {cpu.model} ({cpu.arch}), {cpu.physical_cores} cores / {cpu.logical_cores} threads")
    free, total = cpu.memory_available / 2**30, cpu.memory_total / 2**30
    print(f"  ISA: {' '.join(cpu.isa) or '-'}; memory {free:.1f} of {total:.1f} GiB free")
    print(f"  ONNX Runtime's CPU kernels: {' '.join(cpu.kernels) or 'baseline (no AVX2 or NEON)'}")
    if hw.gpus:
        print(f"GPU driver {hw.driver_version}, CUDA {hw.cuda_driver_version}")
    for g in hw.gpus:
        kind = "integrated" if g.integrated else "discrete"
        print(
            f"GPU {g.device_id}: {g.name} ({kind}, compute {g.compute_capability[0]}.{g.compute_capability[1]}), "
            f"memory {g.memory_free / 2**30:.1f} of {g.memory_total / 2**30:.1f} GiB free, {g.uuid}"
        )
    if not hw.gpus:
        print(f"GPU: none ({hw.nvml})")
    for p in hw.providers:
        print(f"{p.name}: {'available' if p.available else 'unavailable: ' + p.reason}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Autotune a model's batch size: through the running daemon (which switches to it), else here."""
    config = _config(args)
    profile = _via_daemon(config, f"/api/models/{args.model}/tune", {})
    if profile is None:
        profile = _tune_here(config, args.model)
    if args.json:
        print(json.dumps(profile, indent=2))
        return 0
    print(f"{profile['model']} on {profile['device']} ({profile['hardware']}), inputs of {profile['seq_len']} tokens")
    print(f"memory allows batches up to {profile['memory_bound']}; latency budget {profile['latency_budget_ms']:g} ms")
    for t in profile["trials"]:
        mark = "  <-" if t["batch"] == profile["chosen"] else ""
        print(f"  batch {t['batch']:>4}: {t['latency_ms']:8.1f} ms  {t['throughput']:8.0f} inputs/s{mark}")
    print(profile["reason"])
    return 0


def cmd_install_service(args: argparse.Namespace) -> int:
    from llmosd.systemd.install import install

    p = install(args.user, dry_run=args.dry_run)
    for path, content in p.files.items():
        if args.dry_run:
            print(f"# {path}\n{content}")
        else:
            print(f"wrote {path}")
    for cmd in p.commands:
        print(("would run: " if args.dry_run else "ran: ") + " ".join(cmd))
    if not args.dry_run:
        where = "%t/llmosd/llmosd.sock" if args.user else "/run/llmosd/llmosd.sock"
        print(
            f"llmosd is enabled and listening on {where} and 127.0.0.1:11411; logs: journalctl "
            + ("--user -u llmosd" if args.user else "-u llmosd")
        )
    return 0


def cmd_discover(args: argparse.Namespace) -> int:
    """The appliances on the LAN (mDNS); ``--watch`` prints each change as it happens until interrupted."""
    from llmosd.discovery.browse import Browser, discover
    from llmosd.discovery.txt import Appliance

    if args.watch:

        def show(event: str, a: Appliance) -> None:
            print(json.dumps({"event": event} | a.as_dict()) if args.json else f"{event:8} {_one_line(a)}", flush=True)

        async def watch() -> None:
            async with Browser(show):
                await asyncio.Event().wait()

        asyncio.run(watch())
        return 0
    found = discover(args.timeout)
    if args.json:
        print(json.dumps([a.as_dict() for a in found], indent=2))
        return 0
    if not found:
        print(f"no llmosd answered on the LAN within {args.timeout:g} s", file=sys.stderr)
        return 1
    for a in found:
        print(_one_line(a))
    return 0


def _one_line(a: Any) -> str:
    models = ", ".join(a.models) + (", ..." if a.models_truncated else "")
    auth = "token required" if a.auth else "no token"
    tls = f"  sha256 {a.fingerprint}" if a.fingerprint else ""
    line = f"{a.name}  {a.url}  llmosd {a.version}  on {', '.join(a.devices)}  [{auth}]  models: {models or '-'}"
    return line + tls


def _tune_here(config: Config, name: str) -> dict[str, Any]:
    from dataclasses import replace

    from llmosd.hardware import probe
    from llmosd.runtime import ProviderSelector, load
    from llmosd.scheduler.tuning import Tuner, TuningPolicy
    from llmosd.store import ModelStore
    from llmosd.tasks import discover

    store, hw, tasks = ModelStore(config.state_dir), probe(), discover()
    selector = ProviderSelector(config.device, config.threads or None, cuda=hw.cuda)
    loaded = load(store, store.manifest(name), selector, tasks.adapters())
    budgets = {t.name: t.latency_budget_ms for t in tasks.values()}
    policy = TuningPolicy(True, config.latency_budget_ms, 128, config.max_sequences, config.kv_cache_mb << 20)
    return Tuner(store, hw, replace(policy, budgets_ms=budgets)).tune(loaded).as_dict()


def _daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The daemon and the box: serve, status, tune, discover, install-service, hardware."""
    s = sub.add_parser("serve", help="run the daemon in the foreground (every config key is a flag: --KEY VALUE)")
    _add_config_flags(s, SERVE_KEYS)
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("status", help="ask the running daemon over its Unix socket")
    _add_config_flags(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    s = sub.add_parser("tune", help="autotune a model's batch size (through the daemon if it runs)")
    _add_config_flags(s)
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tune)
    s = sub.add_parser("discover", help="list the llmosd appliances on the LAN (mDNS)")
    s.add_argument("--timeout", type=float, default=3.0, help="seconds to listen for answers (default 3)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--watch", action="store_true", help="keep listening; print appliances as they come and go")
    s.set_defaults(func=cmd_discover)
    s = sub.add_parser("install-service", help="write the systemd units for this install, enable and start them")
    s.add_argument("--user", action="store_true", help="your own user manager (systemctl --user), no root")
    s.add_argument("--dry-run", action="store_true", help="print the files and commands, change nothing")
    s.set_defaults(func=cmd_install_service)
    s = sub.add_parser("hardware", help="what the hardware probe sees on this box")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_hardware)


class _ListArchitectures(argparse.Action):
    """``llmosd export --list-architectures``: an action that prints and exits, as --version does (no
    folder, task or name needed)."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from exporters.fused import ARCHITECTURES, NOT_ADMITTED

        width = max(map(len, [*ARCHITECTURES, *NOT_ADMITTED]))
        lines = ["fused graph (KV cache in place; fp32, int8 or int4; each export gated against PyTorch):"]
        lines += [f"  {kind:<{width}}  {what}" for kind, what in sorted(ARCHITECTURES.items())]
        if NOT_ADMITTED:
            lines += ["refused by the fused recipe (optimum's generic graph serves them, slower):"]
            lines += [f"  {kind:<{width}}  {why}" for kind, why in sorted(NOT_ADMITTED.items())]
        lines += ["any other causal LM transformers loads: optimum's generic graph (--exporter optimum)"]
        print("\n".join(lines))
        parser.exit(0)


def _pull_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("pull", help="download a model from Hugging Face by name, export, validate and store it")
    _add_config_flags(s)
    s.add_argument("ref", help="hf.co/ORG/REPO[@REVISION][:QUANT] (QUANT: one GGUF file, e.g. Q4_K_M)")
    s.add_argument("--task", default=None, help="default: from the checkpoint (its architecture, its files)")
    s.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS), help="as llmosd export takes it")
    s.add_argument("--name", default=None, help="store it under this name (default: the repository's, lowercased)")
    s.add_argument("--no-activate", action="store_true", help="store without making it the active version")
    s.set_defaults(func=cmd_pull)


def _export_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("export", help="export a Hugging Face model folder into the store")
    _add_config_flags(s)
    s.add_argument(
        "--list-architectures",
        action=_ListArchitectures,
        help="print the causal-LM architectures the fused recipe builds, and those it refuses, then exit",
    )
    s.add_argument("src", help="Hugging Face model folder")
    # The installed tasks are checked when the command runs: listing them here would import every
    # task package for each command line.
    s.add_argument(
        "--task", required=True, help="an installed task: feature-extraction, text-generation... (GET /api/tasks)"
    )
    s.add_argument(
        "--precision", default="auto", choices=("auto", *PRECISIONS), help="auto: the fastest the gate passes"
    )
    s.add_argument("--name", required=True)
    s.add_argument("--version", default=None, help="positive integer (default: next)")
    s.add_argument("--no-activate", action="store_true", help="store without making it the active version")
    s.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a validation tolerance (min_cosine, mean_cosine, max_abs_diff, label_agreement, "
        "top1_agreement, perplexity_ratio)",
    )
    s.add_argument(
        "--exporter",
        default="auto",
        choices=("auto", "fused", "optimum"),
        help="causal LMs: the fused graph (onnxruntime-genai's builder) where it builds the architecture, or optimum's",
    )
    s.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe option (fused int4: int4_algo_config, int4_block_size, int4_is_symmetric, int4_accuracy_level)",
    )
    s.add_argument(
        "--sampling",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a default sampling parameter (temperature, top_p, top_k, repetition_penalty, …), over the model's own",
    )
    s.set_defaults(func=cmd_export)


def _model_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The store and the registry: llmosd models …"""
    models = sub.add_parser("models", help="inspect the model store").add_subparsers(dest="models", required=True)
    _model_store_commands(models)
    _model_transfer_commands(models)


def _model_store_commands(models: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """What is in the store: list, activate, rollback, set, show, rm."""
    s = models.add_parser("list")
    _add_config_flags(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models_list)
    s = models.add_parser("activate", help="make a stored version the active one (served at once)")
    _add_config_flags(s)
    s.add_argument("name")
    s.add_argument("version")
    s.set_defaults(func=cmd_models_activate)
    s = models.add_parser("rollback", help="activate the newest version older than the active one")
    _add_config_flags(s)
    s.add_argument("name")
    s.set_defaults(func=cmd_models_rollback)
    s = models.add_parser("set", help="set a model's default sampling (KEY=VALUE; KEY= unsets), as a Modelfile")
    _add_config_flags(s)
    s.add_argument("name")
    s.add_argument("values", nargs="+", metavar="KEY=VALUE", help="temperature, top_p, top_k, repetition_penalty, …")
    s.set_defaults(func=cmd_models_set)
    for name, func, help in (
        ("show", cmd_models_show, "print a manifest"),
        ("rm", cmd_models_rm, "remove a model or one version"),
    ):
        s = models.add_parser(name, help=help)
        _add_config_flags(s)
        s.add_argument("ref", help="NAME or NAME:VERSION")
        s.set_defaults(func=func)


def _model_transfer_commands(models: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Between the store and registries or archives: push, pull, archives, keys and signatures."""
    s = models.add_parser("push", help="push a version to an OCI registry")
    _add_config_flags(s)
    s.add_argument("ref", help="NAME or NAME:VERSION")
    s.add_argument("target", help="REGISTRY/REPO:TAG, e.g. registry.local:5000/models/minilm:stable")
    s.add_argument("--insecure", action="store_true", help="plain HTTP (loopback registries use it anyway)")
    s.set_defaults(func=cmd_models_push)
    s = models.add_parser("pull", help="pull a model from an OCI registry into the store")
    _add_config_flags(s)
    s.add_argument("source", help="REGISTRY/REPO[:TAG|@sha256:DIGEST]")
    s.add_argument("--name", default=None, help="store it under this name (default: the name it was pushed as)")
    s.add_argument("--no-activate", action="store_true", help="store without making it the active version")
    s.add_argument("--insecure", action="store_true", help="plain HTTP (loopback registries use it anyway)")
    s.add_argument("--allow-unsigned", action="store_true", help="accept a model no trusted key signed")
    s.set_defaults(func=cmd_models_pull)
    s = models.add_parser("export-archive", help="write models to an OCI image-layout tar (air-gapped installs)")
    _add_config_flags(s)
    s.add_argument("sources", nargs="+", help="NAME[:VERSION] from the store, or REGISTRY/REPO:TAG")
    s.add_argument("-o", "--output", required=True, help="the .tar to write")
    s.add_argument("--key", default=None, help="sign each model in the archive with this private key")
    s.set_defaults(func=cmd_models_export_archive)
    s = models.add_parser("import-archive", help="store (and activate) every model in an OCI image-layout tar")
    _add_config_flags(s)
    s.add_argument("archive")
    s.add_argument("--no-activate", action="store_true", help="store without making them the active versions")
    s.add_argument("--allow-unsigned", action="store_true", help="accept models no trusted key signed")
    s.set_defaults(func=cmd_models_import_archive)
    s = models.add_parser("keygen", help="make an ed25519 signing key (KEY and KEY.pub)")
    s.add_argument("key", help="where to write the private key")
    s.set_defaults(func=cmd_models_keygen)
    s = models.add_parser("sign", help="sign a pushed model (its manifest digest) in the registry")
    _add_config_flags(s)
    s.add_argument("target", help="REGISTRY/REPO:TAG or REGISTRY/REPO@sha256:DIGEST")
    s.add_argument("--key", required=True, help="the private key (from llmosd models keygen)")
    s.add_argument("--insecure", action="store_true", help="plain HTTP (loopback registries use it anyway)")
    s.set_defaults(func=cmd_models_sign)


def cmd_tokens_add(args: argparse.Namespace) -> int:
    from llmosd.tokens import add_token, parse_scopes

    config = _config(args)
    token = add_token(config.token_file, args.name, parse_scopes(args.scope))
    print(token)
    print(f"added token {args.name!r}: reload the daemon to apply it (systemctl reload llmosd)", file=sys.stderr)
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    from llmosd.tokens import list_tokens

    tokens = list_tokens(_config(args).token_file)
    if args.json:
        print(json.dumps(tokens, indent=2))
    for t in [] if args.json else tokens:
        scopes = t["scopes"] if isinstance(t["scopes"], list) else []
        print(f"{t['name']}  {','.join(str(x) for x in scopes)}  created {t['created']}")
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    from llmosd.tokens import revoke_token

    revoke_token(_config(args).token_file, args.name)
    print(f"revoked token {args.name!r}: reload the daemon to apply it (systemctl reload llmosd)")
    return 0


def _served_certificate(args: argparse.Namespace) -> tuple[Path, Any]:
    from cryptography import x509

    from llmosd.tls import CertError
    from llmosd.tls.certs import describe
    from llmosd.tls.server import certificate_path

    path = certificate_path(_config(args))
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        raise CertError(f"no certificate at {path} yet: the daemon makes it when it first starts with TLS on") from None
    except OSError as exc:
        raise CertError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return path, describe(x509.load_pem_x509_certificates(pem)[0])
    except ValueError:
        raise CertError(f"{path} holds no PEM certificate") from None


def cmd_cert_export(args: argparse.Namespace) -> int:
    """The PEM a client trusts (``curl --cacert``): only the leaf, which is all a self-signed box has."""
    _, cert = _served_certificate(args)
    sys.stdout.write(cert.pem.decode())
    return 0


def cmd_cert_show(args: argparse.Namespace) -> int:
    path, cert = _served_certificate(args)
    if args.json:
        print(json.dumps({"path": str(path)} | cert.as_dict(), indent=2))
        return 0
    print(f"certificate  {path}{' (self-signed)' if cert.self_signed else ''}")
    print(f"sha256       {cert.fingerprint}")
    print(f"valid until  {cert.not_after:%Y-%m-%d %H:%M} UTC")
    print(f"names        {', '.join([*cert.dns_names, *cert.addresses]) or '-'}")
    return 0


def _cert_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The TCP port's TLS certificate: llmosd cert export | show."""
    cert = sub.add_parser("cert", help="the TLS certificate LAN clients pin").add_subparsers(dest="cert", required=True)
    s = cert.add_parser("export", help="print the certificate (PEM), for curl --cacert and other clients")
    _add_config_flags(s)
    s.set_defaults(func=cmd_cert_export)
    s = cert.add_parser("show", help="its SHA-256 fingerprint (what mDNS advertises), expiry and names")
    _add_config_flags(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cert_show)


def _token_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Named, scoped bearer tokens for LAN clients: llmosd tokens add | list | revoke."""
    tokens = sub.add_parser("tokens", help="named, scoped bearer tokens").add_subparsers(dest="tokens", required=True)
    s = tokens.add_parser("add", help="print a new token (shown once; stored hashed)")
    _add_config_flags(s)
    s.add_argument("name")
    s.add_argument("--scope", required=True, help="infer, read, admin (comma-separated)")
    s.set_defaults(func=cmd_tokens_add)
    s = tokens.add_parser("list", help="names, scopes, creation times")
    _add_config_flags(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tokens_list)
    s = tokens.add_parser("revoke", help="remove a token")
    _add_config_flags(s)
    s.add_argument("name")
    s.set_defaults(func=cmd_tokens_revoke)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmosd", description="Edge appliance daemon for language models")
    p.add_argument("--version", action="version", version=f"llmosd {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    _daemon_commands(sub)
    _export_command(sub)
    _pull_command(sub)
    _model_commands(sub)
    _token_commands(sub)
    _cert_commands(sub)
    from llmosd.ray.deploy import add_parser  # imports Ray only when it runs

    add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from llmosd.export import ExportError
    from llmosd.listeners import ListenError
    from llmosd.registry import RegistryError
    from llmosd.store import StoreError
    from llmosd.store.manifest import ManifestError
    from llmosd.store.names import InvalidName
    from llmosd.systemd.install import InstallError
    from llmosd.tls import CertError
    from llmosd.tokens import TokenError

    try:
        result: int = args.func(args)
        return result
    except (
        ConfigError,
        ExportError,
        StoreError,
        ManifestError,
        InvalidName,
        ListenError,
        RegistryError,
        InstallError,
        TokenError,
        CertError,
    ) as exc:
        print(f"llmosd: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a malformed registry reference
        print(f"llmosd: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # aiohttp's connection errors are OSErrors too: a registry that is down
        print(f"llmosd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
