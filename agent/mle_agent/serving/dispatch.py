"""One inference request: which loaded versions it runs (its plan), and running that plan.

`plan_request` runs under the registry lock: it reads the route snapshot once and takes a lease
on every version the request will use, so none of them can be closed until the request is done
with it. `dispatch` runs outside the lock and applies the route's policy (see routing.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mle_agent.serving.loaded import LoadedVersion, check_inputs, check_outputs
from mle_agent.serving.policies import ShadowMirror, run_consensus, run_fallback
from mle_agent.serving.routing import CONSENSUS, FALLBACK, Route, pick
from mle_proto.errors import FailedPrecondition, InvalidInput, NotFound

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from mle_agent.serving.registry import InferRequest
    from mle_agent.serving.state import ModelState

    Outputs = dict[str, npt.NDArray[np.generic]]

__all__ = ["Plan", "dispatch", "plan_request"]


@dataclass
class Plan:
    """The leased versions one request runs; `route` is None for an explicit version."""

    route: Route | None
    main: LoadedVersion  # the split's pick, the fallback primary, or the first member
    secondary: LoadedVersion | None = None
    members: list[LoadedVersion] = field(default_factory=list)
    shadow: LoadedVersion | None = None
    held: list[LoadedVersion] = field(default_factory=list)  # leases this request still owns

    def take(self, version: LoadedVersion) -> LoadedVersion:
        """Hand one lease over to whoever releases it instead of `release`."""
        self.held.remove(version)
        return version

    def release(self) -> None:
        """Return every lease still held."""
        while self.held:
            self.held.pop().release()


def plan_request(model: ModelState, request: InferRequest) -> Plan | None:
    """Lease what the request needs; None when something it needs is still loading."""
    route = None if request.version is not None else model.route
    versions = _versions(model, request, route)
    if versions is None:
        return None
    found: list[LoadedVersion] = []
    for version in versions:
        loaded = model.loaded.get(version)
        if loaded is None:
            if version in model.loading or model.swapping:
                return None
            raise _not_loaded(model, version, explicit=route is None)
        found.append(loaded)
    shadow = model.loaded.get(route.shadow) if route and route.shadow else None
    held = [*found, shadow] if shadow else list(found)
    for index, loaded in enumerate(held):
        if not loaded.acquire():  # being unloaded right now: look again once it is gone
            for taken in held[:index]:
                taken.release()
            return None
    plan = Plan(route, found[0], shadow=shadow, held=held)
    if route and route.policy == FALLBACK:
        plan.secondary = found[1]
    elif route and route.policy == CONSENSUS:
        plan.members = found
    return plan


def dispatch(
    plan: Plan, request: InferRequest, pool: Executor, mirror: ShadowMirror
) -> tuple[int, Outputs, dict[str, str]]:
    """Run the plan: (answering version, the outputs asked for, response parameters)."""
    main = plan.main
    try:
        check_inputs(main.label, main.manifest.inputs, request.inputs)
        check_outputs(main.label, main.manifest.outputs, request.outputs)
    except InvalidInput:
        main.counters.record_rejected()
        raise
    policy = plan.route.policy if plan.route else ""
    if policy == FALLBACK:
        version, outputs, parameters = _fallback(plan, request, pool)
    elif policy == CONSENSUS:
        version, outputs, parameters = _consensus(plan, request, pool)
    else:
        version, outputs, parameters = main.manifest.version, main.run(request.inputs), {}
    if plan.shadow is not None:
        shadow = plan.take(plan.shadow)
        run = functools.partial(shadow.run, request.inputs, record=False)
        mirror.submit(run, outputs, shadow.counters, shadow.release)
    return version, _select(outputs, request.outputs), parameters


def _versions(
    model: ModelState, request: InferRequest, route: Route | None
) -> Sequence[int] | None:
    """The versions to lease, main first; None to wait for a first route."""
    if request.version is not None:
        if request.version not in model.manifests:
            raise NotFound(f"model {model.name} has no version {request.version}")
        return [request.version]
    if route is None:
        if model.loading or model.swapping:
            return None
        raise FailedPrecondition(f"model {model.name} has no route; route traffic to a version")
    if route.policy == CONSENSUS:
        return route.members
    main = pick(route, request.request_id)
    return [main, route.secondary] if route.policy == FALLBACK else [main]


def _not_loaded(model: ModelState, version: int, *, explicit: bool) -> FailedPrecondition:
    # Not "unavailable": waiting or retrying does not help until the operator acts.
    if version in model.failed:
        return FailedPrecondition(
            f"model {model.name} version {version} failed to load: {model.failed[version]}"
        )
    hint = "; route traffic to it first" if explicit else ""
    return FailedPrecondition(f"model {model.name} version {version} is not loaded{hint}")


def _fallback(
    plan: Plan, request: InferRequest, pool: Executor
) -> tuple[int, Outputs, dict[str, str]]:
    assert plan.route is not None and plan.secondary is not None
    primary = plan.take(plan.main)
    secondary = plan.secondary

    def run_primary() -> Outputs:
        try:
            return primary.run(request.inputs)
        finally:
            primary.release()

    outputs, fell_back = run_fallback(
        run_primary,
        functools.partial(secondary.run, request.inputs),
        plan.route.deadline_seconds,
        pool,
        cancelled=primary.release,
    )
    if not fell_back:
        return primary.manifest.version, outputs, {}
    secondary.counters.record_fallback()
    return secondary.manifest.version, outputs, {"mle_policy": "fallback"}


def _consensus(
    plan: Plan, request: InferRequest, pool: Executor
) -> tuple[int, Outputs, dict[str, str]]:
    members = [(m.manifest.version, functools.partial(m.run, request.inputs)) for m in plan.members]
    version, outputs = run_consensus(members, pool)
    voters = ",".join(str(v) for v, _ in members)
    return version, outputs, {"mle_consensus": voters}


def _select(outputs: Outputs, wanted: Sequence[str]) -> Outputs:
    return {name: outputs[name] for name in wanted} if wanted else outputs
