"""What a step may refer to in templates and `when:`: params, matrix values, upstream results."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mle_cli.recipe._fields import closest
from mle_cli.recipe.plan import ParamValue, Step

__all__ = [
    "APPROVE",
    "FIELDS",
    "SELECT",
    "StepScope",
    "dotted",
    "has_metrics",
    "produced",
    "step_scopes",
]

SELECT, APPROVE = "mle/select", "mle/approve"
FIELDS = ("status", "metrics", "outputs")

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class StepScope:
    """One step, the params, and the steps whose results it may read (its transitive needs)."""

    step: Step
    params: Mapping[str, ParamValue]
    upstream: frozenset[str]
    steps: Mapping[str, Step]
    groups: Mapping[str, tuple[str, ...]]

    def step_problem(self, ref: str) -> str | None:
        """Why `steps.<ref>` cannot be used here, or None."""
        if ref in (self.step.id, self.step.group):
            return "a step cannot refer to its own result"
        if ref in self.groups:
            children = self.groups[ref]
            return (
                f"{dotted(('steps', ref))!r} is a matrix of {len(children)} steps: pick one with "
                f"a step that uses mle/select, or name one, e.g. {dotted(('steps', children[0]))}"
            )
        if ref not in self.steps:
            hint = closest(ref, [*self.groups, *(s for s in self.steps if s != self.step.id)])
            return f"unknown step {ref!r}" + (f" (did you mean {hint!r}?)" if hint else "")
        if ref not in self.upstream:
            return f"step {ref!r} is not upstream of {self.step.id!r} (list it in needs)"
        return None

    def field_problem(self, ref: str, field: str | int) -> str | None:
        """Why `steps.<ref>.<field>` cannot be used here, or None (ref is known to be fine)."""
        if field not in FIELDS:
            return (
                f"unknown field {dotted(('steps', ref, field))!r} "
                "(use status, metrics.NAME or outputs)"
            )
        if field == "metrics" and not has_metrics(self.steps[ref]):
            return f"step {ref!r} declares no metrics file (add metrics: to it)"
        return None


def step_scopes(params: Mapping[str, ParamValue], steps: Sequence[Step]) -> dict[str, StepScope]:
    """The scope of every step; `steps` must be in topological order."""
    by_id = {s.id: s for s in steps}
    groups: dict[str, list[str]] = {}
    for s in steps:
        if s.group:
            groups.setdefault(s.group, []).append(s.id)
    frozen_groups = {name: tuple(ids) for name, ids in groups.items()}
    upstream: dict[str, frozenset[str]] = {}
    for s in steps:
        upstream[s.id] = frozenset(s.needs).union(*(upstream[n] for n in s.needs))
    return {s.id: StepScope(s, params, upstream[s.id], by_id, frozen_groups) for s in steps}


def has_metrics(step: Step) -> bool:
    """Whether a step reports metrics: it declares a file, or it selects among steps that do."""
    return step.metrics is not None or step.uses == SELECT


def produced(steps: Mapping[str, Step], step: Step, passed_on: bool = False) -> tuple[str, ...]:
    """The paths a step places in its dependants' work dirs (mle/select: its candidates' ones).

    With `passed_on`, mle/approve passes on its needs' paths too (the same files: no clash)."""
    if step.uses == APPROVE and passed_on:
        return _unique(p for need in step.needs for p in produced(steps, steps[need], True))
    if step.uses != SELECT:
        return step.outputs
    return _unique(p for need in step.needs for p in produced(steps, steps[need], passed_on))


def dotted(parts: Iterable[str | int]) -> str:
    """`('steps', 'train-big', 'outputs', 0)` -> `steps["train-big"].outputs[0]`."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _IDENTIFIER.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
