"""``llmosd ray deploy MODEL...``: connect to a running Ray cluster, start Serve's HTTP proxy on it (if
not started), and run the llmosd application there; it keeps running after this command returns."""

from __future__ import annotations

import argparse
from pathlib import Path

APP = "llmosd"


def autoscale(value: str) -> tuple[int, int]:
    low, _, high = value.partition(":")
    try:
        pair = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas (got {value!r})") from None
    if not 0 <= pair[0] <= pair[1] or pair[1] < 1:
        raise argparse.ArgumentTypeError(f"expected 0 <= MIN <= MAX, MAX >= 1 (got {value!r})")
    return pair


def number(value: str, low: float, strict: bool) -> float:
    try:
        got = float(value)
    except ValueError:
        got = float("nan")
    if not (got > low if strict else got >= low):  # nan fails both
        raise argparse.ArgumentTypeError(f"expected a number {'>' if strict else '>='} {low:g} (got {value!r})")
    return got


def count(value: str) -> int:
    try:
        got = int(value)
    except ValueError:
        got = -1
    if got < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0 (got {value!r})")
    return got


def seconds(value: str) -> float:
    return number(value, 0, strict=False)


def positive(value: str) -> float:
    return number(value, 0, strict=True)


def proxy_address() -> tuple[str, int]:
    """Where Serve's proxy listens: fixed by the first ``serve.start`` on a cluster, which later ones
    cannot change (Serve only logs a warning), so it is read back rather than assumed."""
    from ray.serve.context import _get_global_client  # no public call gives the proxy's address

    client = _get_global_client()  # raises when no controller runs; None only if told not to
    assert client is not None
    config = client.http_config
    return str(config.host), int(config.port)


def deploy(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("Ray Serve is not installed: pip install 'llmosd[ray]'")
        return 2

    from llmosd.ray.app import application
    from llmosd.ray.replica import Autoscale
    from llmosd.store import ModelStore

    state = Path(args.state_dir).resolve()
    store = ModelStore(state)
    missing = [m for m in args.models if not store.active_version(m)]
    if missing:  # checked here, where the path is this node's: every node must see the same store
        print(f"not in the store at {state}: {', '.join(missing)}")
        return 2
    ray.init(address=args.address, namespace=APP, log_to_driver=False)
    serve.start(http_options={"host": args.http_host, "port": args.http_port})
    host, port = proxy_address()
    if (host, port) != (args.http_host, args.http_port):
        print(f"Serve's HTTP proxy was started earlier on {host}:{port}; --http-host/--http-port are ignored")
    settings = {"threads": args.threads} if args.threads else {"threads": max(1, int(args.num_cpus))}
    scaling = None
    if args.autoscale is not None:
        low, high = args.autoscale
        scaling = Autoscale(low, high, args.target_ongoing, args.upscale_delay, args.downscale_delay)
    app = application(
        args.models, str(state), settings, args.replicas, scaling, args.num_cpus, args.num_gpus, args.ingress_replicas
    )
    serve.run(app, name=APP, route_prefix="/")
    print(f"llmosd on Ray Serve: http://{host}:{port}/v1 ({', '.join(args.models)})")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ray_cmd = sub.add_parser("ray", help="scale out on a Ray cluster (Ray Serve; pip install 'llmosd[ray]')")
    rsub = ray_cmd.add_subparsers(dest="ray_command", required=True)
    d = rsub.add_parser("deploy", help="serve MODELs from the store on Ray Serve replicas")
    d.add_argument("models", nargs="+", metavar="MODEL")
    d.add_argument("--address", default="auto", help="the Ray cluster (default: the one this node is in)")
    scale = d.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=None, help="a fixed number of replicas (default 1)")
    scale.add_argument(
        "--autoscale", type=autoscale, default=None, metavar="MIN:MAX", help="autoscale on ongoing requests"
    )
    d.add_argument("--target-ongoing", type=positive, default=8.0, help="ongoing requests per replica (autoscale)")
    d.add_argument("--upscale-delay", type=seconds, default=10.0, help="seconds of load before a replica is added")
    d.add_argument("--downscale-delay", type=seconds, default=600.0, help="seconds of lull before one is removed")
    d.add_argument("--num-cpus", type=float, default=1.0, help="CPUs each replica takes (Ray's resources)")
    d.add_argument("--num-gpus", type=float, default=0.0, help="GPUs each replica takes")
    d.add_argument(
        "--ingress-replicas",
        type=count,
        default=1,
        help="ingress replicas, which resend what a dead replica held (0: the replicas on the proxy directly)",
    )
    d.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads per model (default: --num-cpus)")
    d.add_argument("--http-host", default="127.0.0.1", help="where Serve's HTTP proxy listens")
    d.add_argument("--http-port", type=int, default=8000)
    d.add_argument("--state-dir", required=True, help="the model store, at the same path on every node")
    d.set_defaults(func=deploy)
