"""Where a request for a model goes: the per-model policy (the ``route`` knob) and the plan it gives,
from what this box has and what the upstreams report. Pure: nothing here touches the network.

- ``local``: this box only (a model it lacks is a 404, a full queue a 429).
- ``prefer-local``: this box, except when it lacks the model, when the model is not loaded and would
  take longer to load than an upstream that has it loaded takes to answer, or (at the moment the
  queue refuses it) when its queue is full.
- ``prefer-remote``: the upstreams that have the model, then this box.
- ``remote``: the upstreams only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

LOCAL, PREFER_LOCAL, PREFER_REMOTE, REMOTE = "local", "prefer-local", "prefer-remote", "remote"
POLICIES = (LOCAL, PREFER_LOCAL, PREFER_REMOTE, REMOTE)


@dataclass(frozen=True)
class RouteTable:
    default: str = LOCAL
    models: Mapping[str, str] = field(default_factory=dict)

    def policy(self, model: str) -> str:
        return self.models.get(model, self.default)

    @property
    def routes_anything(self) -> bool:
        """Whether any model may leave this box (when not, the api skips routing entirely)."""
        return self.default != LOCAL or any(p != LOCAL for p in self.models.values())


def parse_routes(value: str) -> RouteTable:
    """``"prefer-local"`` or ``"local,gpt-4o-mini=remote,smollm2=prefer-remote"``: at most one bare
    policy (the default) and NAME=POLICY items."""
    default, models = LOCAL, {}
    bare = 0
    for item in (x.strip() for x in value.split(",")):
        if not item:
            continue
        name, eq, policy = item.rpartition("=") if "=" in item else ("", "", item)
        policy, name = policy.strip(), name.strip()
        if policy not in POLICIES:
            raise ValueError(f"{policy!r} is not a policy (one of {', '.join(POLICIES)})")
        if not eq:
            bare += 1
            default = policy
        elif not name:
            raise ValueError(f"{item!r} names no model")
        else:
            models[name] = policy
    if bare > 1:
        raise ValueError("more than one default policy (name the models: NAME=POLICY)")
    return RouteTable(default, models)


@dataclass(frozen=True)
class Local:
    """What this box has of a model."""

    stored: bool  # the store has an active version
    loaded: bool
    load_s: float  # what loading it would take (the last load, or an estimate from its size)


@dataclass(frozen=True)
class Candidate:
    """An upstream that lists the model."""

    route: str  # "lan:<name>" or "upstream:<name>"
    loaded: bool  # it reports the model loaded (an OpenAI-compatible server: listed)
    answer_s: float  # how long it has taken to answer (time to its response headers)


@dataclass(frozen=True)
class Plan:
    targets: tuple[str, ...]  # routes in the order to try them; "local" is this box
    reason: str  # why the first is first, for the journal
    overflow: bool = False  # local first, the others only when its queue is full
    load_here: bool = False  # an upstream answers while the model loads here for the requests after


def plan(policy: str, local: Local, remotes: Sequence[Candidate]) -> Plan:
    """The targets to try, in order. A target after the first is tried only when the one before did not
    accept the request (it could not be reached, or refused it at once: a full queue, 429, 503)."""
    routes = tuple(c.route for c in remotes)
    here = (LOCAL,) if local.stored else ()
    if policy == LOCAL or (not remotes and policy != REMOTE):
        return Plan((LOCAL,), "policy local" if policy == LOCAL else "no upstream has it")
    if policy == REMOTE:
        return Plan(routes, "policy remote" if routes else "policy remote, and no upstream has it")
    if policy == PREFER_REMOTE:
        return Plan(routes + here, "policy prefer-remote")
    if not local.stored:
        return Plan(routes, "not in this box's store")
    if not local.loaded:
        ready = [c for c in remotes if c.loaded and c.answer_s < local.load_s]
        if ready:
            first = min(ready, key=lambda c: c.answer_s)
            rest = tuple(r for r in routes if r != first.route)
            return Plan(
                (first.route, LOCAL, *rest),
                f"not loaded here (a load takes ~{local.load_s:.1f} s; "
                f"{first.route} answers in ~{first.answer_s:.1f} s)",
                load_here=True,
            )
    return Plan((LOCAL, *routes), "prefer-local", overflow=True)
