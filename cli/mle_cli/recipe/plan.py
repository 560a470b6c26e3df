"""The compiled form of a recipe: a validated DAG of steps, ready for the scheduler.

A plan is stored as canonical JSON (`plan_to_json`) so that `mle resume` runs exactly the plan
that was started; `Plan.hash` identifies it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mle_cli.errors import RecipeError

__all__ = [
    "ParamValue",
    "Plan",
    "RetryPolicy",
    "ShippedFile",
    "SourceLocation",
    "Step",
    "plan_from_json",
    "plan_to_json",
]

PLAN_FORMAT = 1

ParamValue = str | int | float | bool | None


@dataclass(frozen=True)
class SourceLocation:
    """Where something was written: file, 1-based line and column."""

    file: Path
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class RetryPolicy:
    """How a failed attempt is retried: `max` extra attempts, exponential backoff."""

    max: int = 0
    backoff: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        return float(min(self.max_delay, self.backoff * self.factor ** (retry - 1)))


@dataclass(frozen=True)
class ShippedFile:
    """A project file shipped to the agents: its work-dir path, its source and content digest."""

    path: str
    source: Path
    digest: str
    size: int


@dataclass(frozen=True)
class Step:
    """One step of a plan. Command and env values are template sources, rendered at dispatch."""

    id: str
    run: str | None
    argv: tuple[str, ...] | None
    env: Mapping[str, str]
    needs: tuple[str, ...]
    outputs: tuple[str, ...]
    target: str
    retries: RetryPolicy
    timeout: float | None
    location: SourceLocation
    # Matrix: the values of this child, and the name of the step it was expanded from.
    matrix: Mapping[str, ParamValue] = field(default_factory=dict)
    group: str = ""
    when: str | None = None  # expression source, checked at compile time, evaluated at dispatch
    trigger: str = "all-succeeded"  # all-succeeded | none-failed | all-done
    metrics: str | None = None  # work-dir path of the step's JSON metrics file
    uses: str | None = None  # an operator-side built-in: mle/approve, mle/select, mle/deploy
    options: Mapping[str, ParamValue] = field(default_factory=dict)  # `with:` (template sources)
    cache: bool = True
    each: bool = False  # once per target matching `target` (mle/deploy)


@dataclass(frozen=True)
class Plan:
    """A compiled recipe. `steps` are in a deterministic topological order."""

    name: str
    description: str
    source: Path
    digest: str
    params: Mapping[str, ParamValue]
    files: tuple[ShippedFile, ...]
    steps: tuple[Step, ...]
    _by_id: Mapping[str, Step] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_id", {s.id: s for s in self.steps})

    def step(self, step_id: str) -> Step:
        """The step with this id."""
        return self._by_id[step_id]

    @functools.cached_property
    def hash(self) -> str:
        """The sha256 (hex) of the plan's canonical JSON: equal plans, equal hashes."""
        return hashlib.sha256(plan_to_json(self).encode("ascii")).hexdigest()


def plan_to_json(plan: Plan) -> str:
    """The plan as canonical JSON: sorted keys, no spaces, ASCII; mappings keep their order."""
    data = {
        "format": PLAN_FORMAT,
        "name": plan.name,
        "description": plan.description,
        "source": str(plan.source),
        "digest": plan.digest,
        "params": _pairs(plan.params),
        "files": [
            {"path": f.path, "source": str(f.source), "digest": f.digest, "size": f.size}
            for f in plan.files
        ],
        "steps": [_step_data(s) for s in plan.steps],
    }
    return json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)


def plan_from_json(text: str) -> Plan:
    """The plan that plan_to_json wrote; RecipeError if the text is not one."""
    try:
        data = json.loads(text)
        if data["format"] != PLAN_FORMAT:
            raise ValueError(f"format {data['format']!r}, expected {PLAN_FORMAT}")
        return Plan(
            name=data["name"],
            description=data["description"],
            source=Path(data["source"]),
            digest=data["digest"],
            params=dict(data["params"]),
            files=tuple(
                ShippedFile(f["path"], Path(f["source"]), f["digest"], f["size"])
                for f in data["files"]
            ),
            steps=tuple(_step_from(s) for s in data["steps"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RecipeError(f"the stored plan cannot be read: {type(exc).__name__}: {exc}") from None


def _pairs(mapping: Mapping[str, Any]) -> list[list[Any]]:
    """A mapping as [key, value] pairs: JSON objects get sorted, and order matters here."""
    return [[key, value] for key, value in mapping.items()]


def _step_data(step: Step) -> dict[str, Any]:
    where, retries = step.location, step.retries
    return {
        "id": step.id,
        "run": step.run,
        "argv": None if step.argv is None else list(step.argv),
        "env": _pairs(step.env),
        "needs": list(step.needs),
        "outputs": list(step.outputs),
        "target": step.target,
        "retries": [retries.max, retries.backoff, retries.factor, retries.max_delay],
        "timeout": step.timeout,
        "location": [str(where.file), where.line, where.col],
        "matrix": _pairs(step.matrix),
        "group": step.group,
        "when": step.when,
        "trigger": step.trigger,
        "metrics": step.metrics,
        "uses": step.uses,
        "options": _pairs(step.options),
        "cache": step.cache,
        "each": step.each,
    }


def _step_from(data: dict[str, Any]) -> Step:
    file, line, col = data["location"]
    return Step(
        id=data["id"],
        run=data["run"],
        argv=None if data["argv"] is None else tuple(data["argv"]),
        env=dict(data["env"]),
        needs=tuple(data["needs"]),
        outputs=tuple(data["outputs"]),
        target=data["target"],
        retries=RetryPolicy(*data["retries"]),
        timeout=data["timeout"],
        location=SourceLocation(Path(file), line, col),
        matrix=dict(data["matrix"]),
        group=data["group"],
        when=data["when"],
        trigger=data["trigger"],
        metrics=data["metrics"],
        uses=data["uses"],
        options=dict(data["options"]),
        cache=data["cache"],
        each=data.get("each", False),  # plans stored before `each` existed
    )
