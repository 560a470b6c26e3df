"""Routes: which version answers a request, and the policies that combine versions.

A `Route` is an immutable value; the registry swaps whole routes, so a request that took a
snapshot keeps a consistent view however the route changes while it runs.

    split      weighted, sticky by request id: blake2b(id) mod 10000 picks a bucket; versions
               own consecutive bucket ranges, newest first, so growing a canary keeps its ids
    shadow     the answer is mirrored to another version in the background; its answer is
               discarded and compared with the primary's (argmax for classifiers, else allclose)
    fallback   the primary (picked by the split) runs under a deadline; if it has not answered
               (or failed) by then, the secondary runs and answers; the primary's late result
               is discarded
    consensus  every member runs; per row the majority class of the first output wins (ties:
               the earliest member's vote); each row's outputs come from the first member that
               voted for that class; the response names the member that agreed on most rows
"""

from __future__ import annotations

import hashlib
import logging
import queue
import random
import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Executor, Future, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mle_proto.errors import AgentUnavailable, InvalidInput, NotFound
from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.stats import VersionCounters

    Outputs = dict[str, npt.NDArray[np.generic]]

__all__ = [
    "BUCKETS",
    "CONSENSUS",
    "FALLBACK",
    "SPLIT",
    "Route",
    "ShadowMirror",
    "bucket_of",
    "disagrees",
    "pick",
    "run_consensus",
    "run_fallback",
    "validate_route",
]

log = logging.getLogger(__name__)

SPLIT, FALLBACK, CONSENSUS = "split", "fallback", "consensus"
BUCKETS = 10_000
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
        """The version that takes most traffic (the first consensus member)."""
        if self.policy == CONSENSUS:
            return self.members[0]
        return max(self.split, key=lambda pair: pair[1])[0]

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


def validate_route(name: str, route: Route, versions: Collection[int]) -> None:
    """InvalidInput when the route is malformed, NotFound when it names an unknown version."""
    for version in sorted(route.versions):
        if version not in versions:
            raise NotFound(f"model {name} has no version {version}")
    if route.policy == CONSENSUS:
        _check_members(name, route.members)
    else:
        _check_split(name, route.split)
    if route.policy == FALLBACK:
        if not route.secondary or route.deadline_seconds <= 0:
            raise InvalidInput(f"model {name}: a fallback route needs a secondary and a deadline")
        if route.secondary in dict(route.split):
            raise InvalidInput(f"model {name}: the secondary must not be in the split")
    if route.shadow and route.shadow in (*dict(route.split), *route.members):
        raise InvalidInput(f"model {name}: version {route.shadow} cannot shadow itself")


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


def disagrees(primary: Outputs, shadow: Outputs) -> bool:
    """Whether two answers differ: argmax per row of the first output, else allclose."""
    import numpy as np

    name = next(iter(primary))
    a, b = primary[name], shadow.get(name)
    if b is None or a.shape != b.shape:
        return True
    if _is_classification(a):
        return bool(np.any(np.argmax(a, axis=-1) != np.argmax(b, axis=-1)))
    return not bool(np.allclose(a, b, rtol=1e-3, atol=1e-5))


def _is_classification(array: npt.NDArray[np.generic]) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f"


def run_fallback(
    primary: Callable[[], Outputs],
    secondary: Callable[[], Outputs],
    deadline: float,
    pool: Executor,
    *,
    cancelled: Callable[[], None],
) -> tuple[Outputs, bool]:
    """The primary's answer if it comes within the deadline, else the secondary's (True).

    `cancelled` runs when the primary never started (so its caller can release what it holds);
    a primary that started finishes in the background and its answer is discarded.
    """
    try:
        future = pool.submit(primary)
    except RuntimeError:  # the pool is shut down: the agent is stopping
        cancelled()
        raise AgentUnavailable("the agent is shutting down") from None
    try:
        return future.result(timeout=deadline), False
    except FutureTimeout:
        if future.cancel():
            cancelled()
    except Exception as exc:  # noqa: BLE001 - a failed primary is what the secondary is for
        log.info("primary failed, the secondary answers: %s", exc)
    return secondary(), True


def run_consensus(
    members: Sequence[tuple[int, Callable[[], Outputs]]], pool: Executor
) -> tuple[int, Outputs, list[int]]:
    """Run every member concurrently; (answering version, outputs, majority class per row)."""
    futures: list[Future[Outputs]] = []
    try:
        for _, run in members[1:]:
            futures.append(pool.submit(run))
        first = members[0][1]()
    except RuntimeError as exc:
        if len(futures) < len(members) - 1:  # submit refused: the pool is shut down
            raise AgentUnavailable("the agent is shutting down") from exc
        raise
    finally:
        wait(futures)  # the caller releases its leases once this returns: nothing may still run
    answers = [first] + [f.result() for f in futures]
    versions = [version for version, _ in members]
    return _combine(versions, answers)


def _combine(versions: Sequence[int], answers: Sequence[Outputs]) -> tuple[int, Outputs, list[int]]:
    import numpy as np

    first = next(iter(answers[0]))
    if answers[0][first].ndim == 0 or not len(answers[0][first]):
        return versions[0], answers[0], []
    votes = np.stack([np.argmax(a[first], axis=-1).reshape(-1) for a in answers])  # member x row
    winners: list[int] = []
    chosen: list[int] = []  # per row, the index of the first member voting for the winner
    for row in range(votes.shape[1]):
        tally = Counter(int(v) for v in votes[:, row])
        best = max(tally.values())
        winner = next(int(v) for v in votes[:, row] if tally[int(v)] == best)
        winners.append(winner)
        chosen.append(int(np.flatnonzero(votes[:, row] == winner)[0]))
    outputs = {
        name: np.stack([answers[m][name][row] for row, m in enumerate(chosen)])
        for name in answers[0]
    }
    agreeing = [int(np.sum(votes[m] == np.array(winners))) for m in range(len(answers))]
    return versions[agreeing.index(max(agreeing))], outputs, winners


class ShadowMirror:
    """Runs mirrored requests on a background thread; a full queue drops (and counts) them."""

    def __init__(self, capacity: int = 64) -> None:
        self._queue: queue.Queue[_Mirrored | None] = queue.Queue(capacity)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(
        self,
        run: Callable[[], Outputs],
        primary: Outputs,
        counters: VersionCounters,
        release: Callable[[], None],
    ) -> None:
        """Queue `run` (the shadow's inference) to compare with `primary`; `release` after."""
        with self._lock:
            if self._closed:
                counters.record_shadow_dropped()
                release()
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="mle-shadow", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(_Mirrored(run, primary, counters, release))
        except queue.Full:
            counters.record_shadow_dropped()
            release()

    def close(self) -> None:
        """Run what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                answer = item.run()
            except Exception:  # noqa: BLE001 - a failing shadow must not affect serving
                item.counters.record_shadow(disagreed=False, ok=False)
            else:
                item.counters.record_shadow(disagreed=disagrees(item.primary, answer))
            finally:
                item.release()


@dataclass(frozen=True)
class _Mirrored:
    run: Callable[[], Outputs]
    primary: Outputs
    counters: VersionCounters
    release: Callable[[], None]
