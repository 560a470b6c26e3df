"""The compiled form of a recipe: a validated DAG of steps, ready for the scheduler."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ParamValue", "Plan", "RetryPolicy", "ShippedFile", "SourceLocation", "Step"]

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
    uses: str | None = None  # a built-in step: "mle/approve", "mle/select"
    options: Mapping[str, ParamValue] = field(default_factory=dict)  # `with:` (template sources)
    cache: bool = True


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
