"""Routes: which version answers a request, and the policies that combine versions.

A `Route` is an immutable value; the registry swaps whole routes, so a request that took a
snapshot keeps a consistent view however the route changes while it runs. policies.py runs the
fallback, consensus and shadow policies described here.

    split      weighted, sticky by request id: blake2b(id) mod 10000 picks a bucket; versions
               own consecutive bucket ranges, newest first, so growing a canary keeps its ids
    shadow     the answer is mirrored to another version in the background; its answer is
               discarded and compared with the primary's (argmax for classifiers, else allclose)
    fallback   the primary (picked by the split) runs under a deadline; if it has not answered
               (or failed) by then, the secondary runs and answers; the primary's late result
               is discarded
    consensus  every member runs; per row the majority class of the first output wins (ties:
               the earliest member's vote); each row's outputs come from the first member that
               voted for that class; the response names the member that agreed on most rows.
               A member's vote is its first output's value when that output is class labels
               (integer [N]), its argmax when it is class scores ([N, C], C > 1); a consensus
               route over any other first output is refused

The primary of a route is the version with the largest share of the split; on a tie (a 50/50
split) the newest (highest) version. A fallback deadline is finite, more than 0 and at most 60 s.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mle_proto.errors import InvalidInput, NotFound
from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from mle_agent.serving.backend import TensorSpec

__all__ = [
    "BUCKETS",
    "CONSENSUS",
    "FALLBACK",
    "MAX_DEADLINE",
    "SPLIT",
    "Route",
    "bucket_of",
    "pick",
    "validate_route",
    "vote_kind",
]

SPLIT, FALLBACK, CONSENSUS = "split", "fallback", "consensus"
BUCKETS = 10_000
MAX_DEADLINE = 60.0  # seconds: a fallback deadline beyond this is a mistake, not a policy
_LABEL_TYPES = frozenset(
    {"BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
)
_FROM_PROTO = {
    pb.ROUTE_POLICY_UNSPECIFIED: SPLIT,
    pb.ROUTE_POLICY_SPLIT: SPLIT,
    pb.ROUTE_POLICY_FALLBACK: FALLBACK,
    pb.ROUTE_POLICY_CONSENSUS: CONSENSUS,
}
_TO_PROTO = {
    SPLIT: pb.ROUTE_POLICY_SPLIT,
    FALLBACK: pb.ROUTE_POLICY_FALLBACK,
    CONSENSUS: pb.ROUTE_POLICY_CONSENSUS,
}


@dataclass(frozen=True)
class Route:
    """How one model's traffic is served; fields a policy does not use are left empty."""

    policy: str = SPLIT
    split: tuple[tuple[int, float], ...] = ()  # (version, percent), newest first
    shadow: int = 0
    secondary: int = 0
    deadline_seconds: float = 0.0
    members: tuple[int, ...] = ()

    @classmethod
    def single(cls, version: int) -> Route:
        """All traffic to one version."""
        return cls(split=((version, 100.0),))

    @classmethod
    def canary(cls, new: int, current: int, percent: float) -> Route:
        """`percent` of traffic to `new`, the rest to `current`."""
        return cls(split=tuple(sorted(((new, percent), (current, 100.0 - percent)), reverse=True)))

    @property
    def primary(self) -> int:
        """The version that takes most traffic, the newest on a tie (the first consensus member)."""
        if self.policy == CONSENSUS:
            return self.members[0]
        return max(self.split, key=lambda pair: (pair[1], pair[0]))[0]

    @property
    def versions(self) -> frozenset[int]:
        """Every version this route runs, shadow included."""
        used = {v for v, _ in self.split} | set(self.members)
        used |= {v for v in (self.shadow, self.secondary) if v}
        return frozenset(used)

    def describe(self) -> str:
        """A short human form, e.g. 'split 2:10% 1:90%, shadow 3'."""
        if self.policy == CONSENSUS:
            text = "consensus of " + ",".join(map(str, self.members))
        else:
            text = f"{self.policy} " + " ".join(f"{v}:{p:g}%" for v, p in self.split)
        if self.policy == FALLBACK:
            text += f" (secondary {self.secondary} after {self.deadline_seconds:g}s)"
        return text + (f", shadow {self.shadow}" if self.shadow else "")

    @classmethod
    def from_proto(cls, message: pb.Route) -> Route:
        """A normalized route from the wire (validate it with `validate_route`)."""
        policy = _FROM_PROTO.get(message.policy)
        if policy is None:
            raise InvalidInput(f"unknown route policy {message.policy}")
        split = tuple(sorted(((w.version, w.percent) for w in message.split), reverse=True))
        if policy == CONSENSUS:
            return cls(policy, shadow=message.shadow, members=tuple(message.members))
        if policy == FALLBACK:
            return cls(policy, split, message.shadow, message.secondary, message.deadline_seconds)
        return cls(policy, split, shadow=message.shadow)

    def to_proto(self) -> pb.Route:
        """The route on the wire."""
        return pb.Route(
            policy=_TO_PROTO[self.policy],
            split=[pb.VersionWeight(version=v, percent=p) for v, p in self.split],
            shadow=self.shadow,
            secondary=self.secondary,
            deadline_seconds=self.deadline_seconds,
            members=list(self.members),
        )

    def to_json(self) -> dict[str, Any]:
        """The route as stored in route.json."""
        return {
            "policy": self.policy,
            "split": [{"version": v, "percent": p} for v, p in self.split],
            "shadow": self.shadow,
            "secondary": self.secondary,
            "deadline_seconds": self.deadline_seconds,
            "members": list(self.members),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Route:
        """A route read back from route.json (KeyError/TypeError/ValueError when malformed)."""
        return cls(
            policy=str(data["policy"]),
            split=tuple((int(w["version"]), float(w["percent"])) for w in data["split"]),
            shadow=int(data["shadow"]),
            secondary=int(data["secondary"]),
            deadline_seconds=float(data["deadline_seconds"]),
            members=tuple(int(m) for m in data["members"]),
        )


def validate_route(
    name: str,
    route: Route,
    versions: Collection[int],
    *,
    outputs: Mapping[int, Sequence[TensorSpec]] | None = None,
) -> None:
    """InvalidInput when the route is malformed, NotFound when it names an unknown version.

    With `outputs` (each version's output specs), a consensus route is refused unless every
    member's first output is something to vote on (see `vote_kind`).
    """
    for version in sorted(route.versions):
        if version not in versions:
            raise NotFound(f"model {name} has no version {version}")
    if route.policy == CONSENSUS:
        _check_members(name, route.members)
        if outputs is not None:
            _check_votes(name, route.members, outputs)
    else:
        _check_split(name, route.split)
    if route.policy == FALLBACK:
        _check_fallback(name, route)
    if route.shadow and route.shadow in (*dict(route.split), *route.members):
        raise InvalidInput(f"model {name}: version {route.shadow} cannot shadow itself")


def vote_kind(spec: TensorSpec) -> str:
    """How consensus votes on an output: "label" (integer [N]), "scores" ([N, C], C > 1), or ""."""
    if len(spec.shape) == 1 and spec.datatype in _LABEL_TYPES:
        return "label"
    if len(spec.shape) == 2 and spec.shape[1] != 1 and spec.datatype != "BOOL":
        return "scores"
    return ""


def _check_votes(
    name: str, members: Sequence[int], outputs: Mapping[int, Sequence[TensorSpec]]
) -> None:
    for version in members:
        specs = outputs.get(version, ())
        if specs and not vote_kind(specs[0]):
            first = specs[0]
            shape = ",".join(map(str, first.shape))
            raise InvalidInput(
                f"model {name}: consensus votes on the first output, which must be class labels "
                f"(integer [N]) or class scores ([N, C]); version {version}'s {first.name!r} is "
                f"{first.datatype} [{shape}]"
            )


def _check_fallback(name: str, route: Route) -> None:
    deadline = route.deadline_seconds
    if not route.secondary or deadline == 0:
        raise InvalidInput(f"model {name}: a fallback route needs a secondary and a deadline")
    if not math.isfinite(deadline) or not 0 < deadline <= MAX_DEADLINE:
        raise InvalidInput(
            f"model {name}: the fallback deadline must be more than 0 and at most "
            f"{MAX_DEADLINE:g} seconds, got {deadline:g}"
        )
    if route.secondary in dict(route.split):
        raise InvalidInput(f"model {name}: the secondary must not be in the split")


def _check_split(name: str, split: Sequence[tuple[int, float]]) -> None:
    if not split:
        raise InvalidInput(f"model {name}: the route names no version")
    if len({v for v, _ in split}) != len(split):
        raise InvalidInput(f"model {name}: a version appears twice in the split")
    if any(not 0 <= p <= 100 for _, p in split):
        raise InvalidInput(f"model {name}: percentages must be between 0 and 100")
    total = sum(p for _, p in split)
    if abs(total - 100.0) > 1e-6:
        raise InvalidInput(f"model {name}: percentages sum to {total:g}, not 100")


def _check_members(name: str, members: Sequence[int]) -> None:
    if len(members) < 2:
        raise InvalidInput(f"model {name}: consensus needs at least 2 members")
    if len(set(members)) != len(members):
        raise InvalidInput(f"model {name}: a version appears twice among the members")


def bucket_of(request_id: str) -> int:
    """The request's bucket in [0, BUCKETS): stable for an id, random for an empty one."""
    if not request_id:
        return random.randrange(BUCKETS)  # noqa: S311 - load spreading, not security
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def pick(route: Route, request_id: str) -> int:
    """The split version that answers this request."""
    bucket = bucket_of(request_id)
    edge = 0.0
    for version, percent in route.split:
        edge += percent * BUCKETS / 100.0
        if bucket < edge:
            return version
    return route.primary  # rounding left the last bucket unowned
