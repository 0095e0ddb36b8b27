"""The llmosd application on Ray Serve: the ingress (on Serve's HTTP proxy) in front of the replicas."""

from __future__ import annotations

from typing import Any, cast

from ray import serve

from llmosd.ray.ingress import Ingress
from llmosd.ray.replica import Autoscale, deployment


def application(
    models: list[str],
    state_dir: str,
    settings: dict[str, Any],
    replicas: int | None = None,
    autoscale: Autoscale | None = None,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    ingress_replicas: int = 1,
) -> serve.Application:
    """The bound application. The ingress takes no CPU of Ray's: it only passes bytes on, and a CPU
    held for it would be one a replica cannot have. With ``ingress_replicas=0`` the replicas take
    Serve's HTTP proxy themselves: one hop less, and what a dying replica held is lost."""
    replica = deployment(replicas, autoscale, num_cpus, num_gpus).bind(models, state_dir, settings)
    if not ingress_replicas:
        return replica
    ingress = cast(serve.Deployment, serve.deployment(Ingress)).options(
        name="llmosd-ingress",
        num_replicas=ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1024,  # each waits on a replica, which bounds the work
    )
    return ingress.bind(replica)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run llmosd.ray.app:app_builder models=all-minilm-l6-v2 state_dir=/srv/llmosd``."""
    models = [m for m in str(args["models"]).split(",") if m]
    threads = {"threads": int(args["threads"])} if "threads" in args else {}
    return application(
        models,
        str(args["state_dir"]),
        threads,
        replicas=int(args.get("replicas", 1)),
        num_cpus=float(args.get("num_cpus", 1)),
        num_gpus=float(args.get("num_gpus", 0)),
        ingress_replicas=int(args.get("ingress_replicas", 1)),
    )
