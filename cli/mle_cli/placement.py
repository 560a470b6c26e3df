"""Placement: the targets a step's `on:` matches, `each:` expanded into one step per target, and
the choice among matching agents at dispatch (a free slot first, then the lowest load).

Pure: the fleet is passed in (`mle_cli.targets.fleet.fleet_targets` reads it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mle_cli.errors import RecipeError
from mle_cli.recipe import DEPLOY, SELECT
from mle_cli.recipe.plan import Plan, Step
from mle_cli.targets.fleet import Target
from mle_cli.targets.selectors import Selector

__all__ = ["Load", "choose", "describe_targets", "explain", "matching", "place_plan"]


@dataclass(frozen=True)
class Load:
    """How busy a matching agent is when a step is placed."""

    name: str
    free_slots: int
    load: float  # 1-minute load average per slot (0 when not known yet)


def matching(selector: str, targets: Sequence[Target]) -> list[Target]:
    """The placeable targets a selector text matches, by name."""
    chosen = Selector.parse(selector)
    return [t for t in targets if t.placeable and chosen.matches(t.name, t.labels)]


def place_plan(plan: Plan, targets: Sequence[Target]) -> Plan:
    """The plan with every selector checked against the fleet and `each:` steps expanded into
    one step per matching target, named `step[target=NAME]`; dependants need all of them."""
    children: dict[str, list[Step]] = {}
    for step in plan.steps:
        if _on_operator(step):
            continue
        found = matching(step.target, targets)
        if not found:
            raise _no_match(step, targets)
        if step.each and step.uses is None:  # mle/deploy rolls out to each target itself
            children[step.id] = [_child(step, t.name) for t in found]
    if not children:
        return plan
    _check_collisions(plan, children)
    steps: list[Step] = []
    for step in plan.steps:
        needs = tuple(n for need in step.needs for n in _ids(need, children))
        for placed in children.get(step.id, [step]):
            steps.append(dataclasses.replace(placed, needs=needs))
    return dataclasses.replace(plan, steps=tuple(steps))


def explain(step: Step, targets: Sequence[Target]) -> str:
    """Where a step will run, and why, for `mle plan`."""
    if _on_operator(step):
        return "operator (built-in)"
    found = [t.name for t in matching(step.target, targets)]
    if Selector.parse(step.target).single_name is not None or len(found) == 1:
        return found[0] if found else step.target
    how = "on each" if step.each else "one of them, with a free slot, then the lowest load"
    return f"{', '.join(found)} ({len(found)} match {step.target}: {how})"


def choose(loads: Sequence[Load]) -> str | None:
    """The agent to place a step on: one with a free slot, then the lowest load, then by name."""
    if not loads:
        return None
    best = min(loads, key=lambda a: (a.free_slots <= 0, a.load, -a.free_slots, a.name))
    return best.name


def describe_targets(targets: Sequence[Target]) -> str:
    """The targets seen, for an error: `local, pi-01 (role=edge), srv-01 (gone)`."""
    return ", ".join(_seen(t) for t in targets) or "none"


def _seen(target: Target) -> str:
    notes = [f"{k}={v}" for k, v in sorted(target.labels.items())]
    if not target.placeable:
        notes.append(target.state if target.state == "gone" else "no address")
    return f"{target.name} ({', '.join(notes)})" if notes else target.name


def _no_match(step: Step, targets: Sequence[Target]) -> RecipeError:
    if Selector.parse(step.target).single_name is None:
        what = f"target matches {step.target!r}"
    else:
        what = f"target {step.target!r}"
    message = f"no {what}; targets seen: {describe_targets(targets)}"
    return RecipeError(
        message,
        file=step.location.file,
        line=step.location.line,
        col=step.location.col,
        key=f"steps.{step.group or step.id}.on",
    )


def _check_collisions(plan: Plan, children: Mapping[str, list[Step]]) -> None:
    """A step needing an `each:` step with outputs would get one copy per target, at one path;
    a step reading an `each:` step's results (`steps.X...` in `when:` or a template) would not
    know whose."""
    for step in plan.steps:
        expanded = [n for n in step.needs if n in children and len(children[n]) > 1]
        clashing = [n for n in expanded if plan.step(n).outputs]
        if clashing and step.uses != SELECT:
            first = plan.step(clashing[0])
            raise _located(
                step,
                "needs",
                f"needs {first.id}, which runs on each of {len(children[first.id])} targets and "
                f"each writes {first.outputs[0]} at the same path: drop its outputs",
            )
        for need in expanded:
            if any(re.search(rf"\bsteps\.{re.escape(need)}\b", text) for text in _texts(step)):
                raise _located(
                    step,
                    "needs",
                    f"reads steps.{need}, which runs on each of {len(children[need])} targets "
                    "(each: true) and so has no single result: need it without reading it",
                )


def _texts(step: Step) -> list[str]:
    """Every template and condition source of a step."""
    texts = [step.when or "", step.run or "", *(step.argv or ()), *step.env.values()]
    return texts + [str(v) for v in step.options.values()]


def _located(step: Step, key: str, message: str) -> RecipeError:
    where = step.location
    return RecipeError(
        message,
        file=where.file,
        line=where.line,
        col=where.col,
        key=f"steps.{step.group or step.id}.{key}",
    )


def _on_operator(step: Step) -> bool:
    """The gates (mle/approve, mle/select) run on the operator's side, placed nowhere."""
    return step.uses is not None and step.uses != DEPLOY


def _child(step: Step, name: str) -> Step:
    base, bracket, inside = step.id.partition("[")
    child_id = f"{base}[{inside[:-1]},target={name}]" if bracket else f"{step.id}[target={name}]"
    return dataclasses.replace(
        step, id=child_id, target=name, each=False, group=step.group or step.id
    )


def _ids(need: str, children: Mapping[str, list[Step]]) -> list[str]:
    return [c.id for c in children[need]] if need in children else [need]
