"""What a plan would do before it runs: placement checks and the description `mle plan` shows."""

from __future__ import annotations

from typing import Any

from mle_cli.errors import RecipeError
from mle_cli.recipe import render_step
from mle_cli.recipe.plan import Plan
from mle_cli.settings import Settings
from mle_cli.targets import LOCAL, known_targets, local_agent_endpoint

__all__ = ["check_placement", "describe_plan"]


def check_placement(plan: Plan) -> None:
    """Every step's target exists; otherwise a located error naming the known targets."""
    targets = known_targets()
    for step in plan.steps:
        if step.target not in targets:
            raise RecipeError(
                f"no target {step.target!r}; known targets: {', '.join(targets)}",
                file=step.location.file,
                line=step.location.line,
                col=step.location.col,
                key=f"steps.{step.id}.on",
            )


def describe_plan(plan: Plan, settings: Settings) -> dict[str, Any]:
    """Steps in order with their DAG stage, placement, rendered command and outputs."""
    check_placement(plan)
    stages: dict[str, int] = {}
    steps = []
    for step in plan.steps:
        stages[step.id] = 1 + max((stages[n] for n in step.needs), default=0)
        rendered = render_step(plan, step, run_id="<run>", target=step.target)
        steps.append(
            {
                "id": step.id,
                "stage": stages[step.id],
                "needs": list(step.needs),
                "target": step.target,
                "run": rendered.shell,
                "argv": list(rendered.argv) if rendered.argv is not None else None,
                "env": rendered.env,
                "outputs": list(step.outputs),
                "retries": step.retries.max,
                "timeout": step.timeout,
            }
        )
    local_state = "running" if local_agent_endpoint(settings) else "started on demand"
    return {
        "name": plan.name,
        "source": str(plan.source),
        "digest": plan.digest,
        "params": dict(plan.params),
        "files": [{"path": f.path, "digest": f.digest, "size": f.size} for f in plan.files],
        "targets": {LOCAL: f"embedded agent on 127.0.0.1 ({local_state})"},
        "steps": steps,
    }
