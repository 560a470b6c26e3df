"""What a plan would do before it runs: placement checks, cache predictions, and the description
`mle plan` shows."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import Any

from mle_cli.errors import RecipeError
from mle_cli.placement import explain, matching
from mle_cli.recipe import render_step
from mle_cli.recipe.plan import Plan, Step
from mle_cli.settings import Settings
from mle_cli.targets import LOCAL, local_agent_endpoint
from mle_cli.targets.fleet import Target
from mle_cli.targets.selectors import Selector

__all__ = ["describe_plan", "local_platform", "place"]


def place(plan: Plan, settings: Settings) -> Plan:
    """The plan placed on the fleet: selectors checked (a located error naming the targets seen
    when one matches nothing) and `each:` steps expanded. The mDNS cache is refreshed by a
    bounded browse first when the plan places a step by glob, labels or `each`, or names a
    target the cache does not have."""
    return _placed(plan, settings)[0]


def _placed(plan: Plan, settings: Settings) -> tuple[Plan, list[Target]]:
    from mle_cli.placement import place_plan
    from mle_cli.targets.fleet import fleet_targets

    remote = [s for s in plan.steps if s.target != LOCAL and (s.uses is None or s.each)]
    fresh = any(s.each or Selector.parse(s.target).single_name is None for s in remote)
    browse = fresh and settings.mdns_browse_seconds > 0
    targets = fleet_targets(settings, browse=browse)
    try:
        return place_plan(plan, targets), targets
    except RecipeError:
        if browse or not remote or settings.mdns_browse_seconds <= 0:
            raise
    targets = fleet_targets(settings, browse=True)
    return place_plan(plan, targets), targets


def local_platform() -> str:
    """The platform class of this machine, as the local agent reports it."""
    from mle_cli.targets.connection import platform_class

    return platform_class(platform.system(), platform.machine())


def describe_plan(plan: Plan, settings: Settings, *, use_cache: bool = True) -> dict[str, Any]:
    """Steps in order with their DAG stage, placement, rendered command, outputs and whether
    each would be cached, and why not."""
    plan, targets = _placed(plan, settings)
    predictor = _CachePredictor(plan, settings, use_cache, targets)
    stages: dict[str, int] = {}
    steps = []
    try:
        for step in plan.steps:
            stages[step.id] = 1 + max((stages[n] for n in step.needs), default=0)
            described = _describe_step(plan, step, stages[step.id], predictor.predict(step))
            steps.append({**described, "placement": explain(step, targets)})
    finally:
        predictor.close()
    local_state = "running" if local_agent_endpoint(settings) else "started on demand"
    return {
        "name": plan.name,
        "source": str(plan.source),
        "digest": plan.digest,
        "hash": plan.hash,
        "params": dict(plan.params),
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in plan.files],
        "targets": {
            LOCAL: f"embedded agent on 127.0.0.1 ({local_state})",
            **{t.name: _target_note(t) for t in targets if t.name != LOCAL},
        },
        "steps": steps,
    }


def _target_note(target: Target) -> str:
    where = target.address or "address not known yet"
    labels = ",".join(f"{k}={v}" for k, v in sorted(target.labels.items()))
    return f"{where} ({target.source}, {target.state}{', ' + labels if labels else ''})"


def _describe_step(plan: Plan, step: Step, stage: int, cache: dict[str, str]) -> dict[str, Any]:
    shell: str | None = None
    argv: list[str] | None = None
    env: dict[str, str] = {}
    if step.uses is None:
        try:
            rendered = render_step(plan, step, run_id="<run>", target=step.target)
            shell, env = rendered.shell, dict(rendered.env)
            argv = list(rendered.argv) if rendered.argv is not None else None
        except RecipeError:
            shell = "(rendered at dispatch: it uses results of earlier steps)"
    return {
        "id": step.id,
        "stage": stage,
        "needs": list(step.needs),
        "target": "operator" if step.uses else step.target,
        "uses": step.uses,
        "when": step.when,
        "matrix": dict(step.matrix),
        "run": shell,
        "argv": argv,
        "env": env,
        "outputs": list(step.outputs),
        "metrics": step.metrics,
        "retries": step.retries.max,
        "timeout": step.timeout,
        "cache": cache,
    }


class _CachePredictor:
    """Walks the plan in order, predicting cache hits from the ledger and the project store.
    A step can only be predicted when every step it needs is predicted to be cached."""

    def __init__(
        self, plan: Plan, settings: Settings, use_cache: bool, targets: Sequence[Target]
    ) -> None:
        from mle_cli.ledger import Ledger
        from mle_proto.store import ArtifactStore

        self._plan = plan
        self._use_cache = use_cache
        self._ledger = Ledger(settings.ledger_path) if settings.ledger_path.exists() else None
        self._store = ArtifactStore(settings.artifacts_dir)
        self._known: dict[str, dict[str, Any]] = {}  # step -> what templates see of it
        self._outputs: dict[str, dict[str, str]] = {}  # step -> path -> digest
        self._targets = targets

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()

    def predict(self, step: Step) -> dict[str, str]:
        if step.uses is not None:
            return {"result": "-", "reason": "built-in step, runs on the operator side"}
        if not (step.cache and self._use_cache):
            return {"result": "off", "reason": "cache: false" if not step.cache else "--no-cache"}
        unknown = [n for n in step.needs if n not in self._known]
        if unknown:
            return {"result": "miss", "reason": f"runs after {unknown[0]}, which will run"}
        if step.when is not None:
            return {"result": "miss", "reason": "its `when:` is decided at run time"}
        return self._lookup(step)

    def _lookup(self, step: Step) -> dict[str, str]:
        from mle_cli import caching
        from mle_cli.ledger import queries
        from mle_cli.scheduler import task_request

        inputs = {f.path: f.digest for f in self._plan.files}
        for need in step.needs:
            inputs.update(self._outputs[need])
        try:
            request = task_request(
                self._plan,
                step,
                run_id="<run>",
                target=step.target,
                attempt=0,
                inputs=inputs,
                steps=self._known,
            )
        except RecipeError:
            return {"result": "miss", "reason": "its command uses results not known yet"}
        platform_class, unknown = self._platform(step)
        if platform_class is None:
            return {"result": "unknown", "reason": unknown}
        files = {f.path: f.digest for f in self._plan.files}
        parts = caching.cache_parts(request, files, platform_class)
        if self._ledger is None:
            return {"result": "miss", "reason": "no earlier runs"}
        hit = caching.find_hit(self._ledger, caching.cache_key(parts), self._store, step.outputs)
        if hit is None:
            previous = queries.last_cache_parts(self._ledger, self._plan.name, step.id)
            return {"result": "miss", "reason": caching.explain_miss(previous, parts)}
        self._known[step.id] = {
            "status": "cached",
            "metrics": dict(hit.metrics),
            "outputs": list(hit.outputs),
        }
        self._outputs[step.id] = {p: o.digest for p, o in hit.outputs.items()}
        return {"result": "hit", "reason": f"same inputs as run {hit.run_id}/{hit.step_id}"}

    def _platform(self, step: Step) -> tuple[str | None, str]:
        """The platform class in the step's cache key (results are shared by platform), or None
        and why it cannot be told before the step is placed."""
        found = matching(step.target, self._targets)
        unseen = [t.name for t in found if not _platform_of(t)]
        if unseen:
            return None, f"the platform of {unseen[0]} is known once it announces itself (mDNS)"
        classes = sorted({_platform_of(t) for t in found})
        if len(classes) > 1:
            return None, f"its targets differ in platform ({', '.join(classes)})"
        return (classes[0], "") if classes else (local_platform(), "")


def _platform_of(target: Target) -> str:
    """A target's platform class from what it announced; "" when it was never seen."""
    if target.source == "local":
        return local_platform()
    from mle_cli.targets.connection import platform_class

    return platform_class(target.os, target.arch) if target.arch else ""
