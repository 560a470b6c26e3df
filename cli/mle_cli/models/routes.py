"""Routes of a served model as the operator writes them, planned purely from the current route.

A route change on `mle deploy NAME` starts from the agent's current route and changes only what
was asked: `--version V` sends everything to V, `--canary P% --version V` sends P% to V and the
rest to the primary, `--shadow V` mirrors to V, `--policy` switches policy (and resets the split to
the primary), `--rollback` is the agent's own history.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from mle_proto.errors import NotFound, UsageError
from mle_proto.v1 import agent_pb2 as pb

__all__ = [
    "MAX_DELAY",
    "POLICIES",
    "RouteChange",
    "RouteSpec",
    "describe_route",
    "parse_change",
    "parse_delay",
    "parse_members",
    "parse_percent",
    "parse_version_ref",
    "plan_route",
    "route_from_pb",
    "route_to_pb",
    "traffic",
]

MAX_DELAY = 60.0  # seconds: the agent refuses longer fallback deadlines too

POLICIES = ("split", "fallback", "consensus")
_POLICY_PB = {
    "split": pb.ROUTE_POLICY_SPLIT,
    "fallback": pb.ROUTE_POLICY_FALLBACK,
    "consensus": pb.ROUTE_POLICY_CONSENSUS,
}


@dataclass(frozen=True)
class RouteSpec:
    """A model's route: the split (version, percent), a shadow, fallback or consensus settings."""

    policy: str = "split"
    split: tuple[tuple[int, float], ...] = ()
    shadow: int = 0
    secondary: int = 0
    deadline: float = 0.0
    members: tuple[int, ...] = ()

    @property
    def primary(self) -> int:
        """The version with the largest share, the newest on a tie, as the agent decides
        (consensus: the first member; 0 = none)."""
        if self.split:
            return max(self.split, key=lambda vw: (vw[1], vw[0]))[0]
        return self.members[0] if self.members else 0

    def percent(self, version: int) -> float:
        """The share of requests this version answers (0 when it is not in the split)."""
        return sum(p for v, p in self.split if v == version)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, for the ledger and `--json`."""
        return {
            "policy": self.policy,
            "split": [{"version": v, "percent": p} for v, p in sorted(self.split)],
            "shadow": self.shadow or None,
            "secondary": self.secondary or None,
            "deadline_seconds": self.deadline or None,
            "members": list(self.members),
        }


@dataclass(frozen=True)
class RouteChange:
    """What the operator asked to change; None / 0 / () = unchanged."""

    version: int = 0
    canary: float = 0.0
    shadow: int | None = None  # 0 removes the shadow
    policy: str | None = None
    deadline: float | None = None
    secondary: int | None = None
    members: tuple[int, ...] = ()

    @property
    def empty(self) -> bool:
        """Nothing to change."""
        return self == RouteChange()


def plan_route(current: RouteSpec, change: RouteChange, versions: Collection[int]) -> RouteSpec:
    """The route after a change; raises UsageError/NotFound for a change that cannot apply."""
    _check_versions(change, versions)
    policy = change.policy or current.policy
    if policy == "consensus" and change.policy is None and (change.version or change.canary):
        policy = "split"  # a canary or a pin leaves consensus: the split applies again
    route = RouteSpec(policy=policy, split=_split(current, change))
    route = _with_policy(route, current, change)
    return _with_shadow(route, current, change)


def route_from_pb(route: pb.Route) -> RouteSpec:
    """A RouteSpec from the agent's Route message."""
    policy = {v: k for k, v in _POLICY_PB.items()}.get(route.policy, "split")
    return RouteSpec(
        policy=policy,
        split=tuple((w.version, w.percent) for w in route.split),
        shadow=route.shadow,
        secondary=route.secondary,
        deadline=route.deadline_seconds,
        members=tuple(route.members),
    )


def route_to_pb(route: RouteSpec) -> pb.Route:
    """The Route message for a RouteSpec."""
    return pb.Route(
        policy=_POLICY_PB[route.policy],
        split=[pb.VersionWeight(version=v, percent=p) for v, p in route.split],
        shadow=route.shadow,
        secondary=route.secondary,
        deadline_seconds=route.deadline,
        members=list(route.members),
    )


def describe_route(route: RouteSpec) -> str:
    """One line: `v1 90%, v2 10%; shadow v3`, `v1 within 20 ms, else v2`, `consensus of v1, v2`."""
    if route.policy == "consensus":
        text = "consensus of " + ", ".join(f"v{m}" for m in route.members)
    else:
        text = ", ".join(f"v{v} {p:g}%" for v, p in sorted(route.split)) or "no route"
        if route.policy == "fallback":
            text += f" within {route.deadline * 1000:g} ms, else v{route.secondary}"
    return text + (f"; shadow v{route.shadow}" if route.shadow else "")


def traffic(route: RouteSpec, version: int) -> str:
    """What a version does in the route, for a table cell: `90%`, `100% <=20ms`, `shadow`,
    `fallback`, `consensus`, `-`."""
    parts = []
    if route.policy == "consensus":
        if version in route.members:
            parts.append("consensus")
    elif any(v == version for v, _ in route.split):
        deadline = f" <={route.deadline * 1000:g}ms" if route.policy == "fallback" else ""
        parts.append(f"{route.percent(version):g}%{deadline}")
    if route.policy == "fallback" and version == route.secondary:
        parts.append("fallback")
    if version == route.shadow:
        parts.append("shadow")
    return ", ".join(parts) or "-"


def parse_change(
    version: int,
    canary: str | None,
    shadow: str | None,
    policy: str | None,
    deadline: str | None,
    secondary: int | None,
    members: str | None,
) -> RouteChange:
    """A RouteChange from `mle deploy`'s flags as typed."""
    if policy is not None and policy not in POLICIES:
        raise UsageError(f"invalid --policy {policy!r}: use {', '.join(POLICIES)}")
    return RouteChange(
        version=version,
        canary=parse_percent(canary) if canary is not None else 0.0,
        shadow=parse_version_ref(shadow, "--shadow") if shadow is not None else None,
        policy=policy,
        deadline=parse_delay(deadline, "--deadline") if deadline is not None else None,
        secondary=secondary,
        members=parse_members(members) if members is not None else (),
    )


def parse_percent(text: str) -> float:
    """`10%` or `10` -> 10.0; strictly between 0 and 100."""
    raw = text.strip().removesuffix("%").strip()
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < 100:
        raise UsageError(f"invalid percentage {text!r}: use a number between 0 and 100, e.g. 10%")
    return value


def parse_delay(text: str, option: str) -> float:
    """`20ms`, `0.5s` or bare seconds -> seconds, above 0 and at most a minute."""
    from mle_cli.recipe._durations import to_seconds

    value = to_seconds(text)
    if value is None or not 0 < value <= MAX_DELAY:
        raise UsageError(
            f"invalid {option} {text!r}: use a duration above 0 and at most 60s, e.g. 20ms"
        )
    return value


def parse_members(text: str) -> tuple[int, ...]:
    """`1,2,3` -> (1, 2, 3): at least two distinct versions."""
    try:
        members = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        members = ()
    if len(members) < 2 or len(set(members)) != len(members) or min(members) < 1:
        raise UsageError(f"invalid --members {text!r}: list two or more versions, e.g. 1,2,3")
    return members


def parse_version_ref(text: str, option: str) -> int:
    """A version number (`3` or `v3`); `off`/`none`/`0` -> 0."""
    raw = text.strip().lower().removeprefix("v")
    if raw in ("off", "none", "0"):
        return 0
    if not raw.isdigit():
        raise UsageError(f"invalid {option} {text!r}: use a version number such as 3")
    return int(raw)


def _check_versions(change: RouteChange, versions: Collection[int]) -> None:
    named = [change.version, change.shadow or 0, change.secondary or 0, *change.members]
    for version in (v for v in named if v):
        if version not in versions:
            known = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise NotFound(f"no version {version} (versions: {known})")
    if change.canary and not change.version:
        raise UsageError("--canary on a deployed model needs --version: the version to try")


def _split(current: RouteSpec, change: RouteChange) -> tuple[tuple[int, float], ...]:
    primary = current.primary
    if change.canary:
        if change.version == primary:
            raise UsageError(f"v{primary} is already the primary; canary another version")
        return ((primary, 100.0 - change.canary), (change.version, change.canary))
    if change.version:
        return ((change.version, 100.0),)
    if change.policy is not None or not current.split:
        return ((primary, 100.0),) if primary else ()
    return current.split


def _with_policy(route: RouteSpec, current: RouteSpec, change: RouteChange) -> RouteSpec:
    same = route.policy == current.policy
    if route.policy != "fallback" and (change.deadline or change.secondary):
        raise UsageError("--deadline and --secondary go with --policy fallback")
    if route.policy != "consensus" and change.members:
        raise UsageError("--members goes with --policy consensus")
    if route.policy == "fallback":
        secondary = change.secondary or (current.secondary if same else 0)
        deadline = change.deadline or (current.deadline if same else 0.0)
        if not secondary or not deadline:
            raise UsageError(
                "--policy fallback needs --secondary VERSION and --deadline, e.g. 20ms"
            )
        if any(v == secondary for v, _ in route.split):
            raise UsageError(f"v{secondary} already serves traffic; the secondary must be another")
        return replace(route, secondary=secondary, deadline=deadline)
    if route.policy == "consensus":
        members = change.members or (current.members if same else ())
        if not members:
            raise UsageError("--policy consensus needs --members, e.g. 1,2,3")
        return replace(route, split=(), members=members)
    return route


def _with_shadow(route: RouteSpec, current: RouteSpec, change: RouteChange) -> RouteSpec:
    serving = ({v for v, _ in route.split} | set(route.members) | {route.secondary}) - {0}
    if change.shadow:
        if change.shadow in serving:
            raise UsageError(f"v{change.shadow} already serves traffic; shadow another version")
        return replace(route, shadow=change.shadow)
    if change.shadow == 0 or change.policy == "split":
        return route
    # An inherited shadow that now serves traffic itself stops being a shadow.
    return route if current.shadow in serving else replace(route, shadow=current.shadow)
