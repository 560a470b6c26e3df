"""Built-in steps that run on the operator side: `mle/approve` and `mle/select`."""

from __future__ import annotations

import asyncio
import getpass
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mle_cli.errors import RecipeError
from mle_cli.executor import OutputFile
from mle_cli.ledger import Ledger, queries
from mle_cli.recipe.plan import Plan, Step

__all__ = ["Decision", "Selection", "operator_name", "select_child", "truthy", "wait_for_decision"]


@dataclass(frozen=True)
class Decision:
    """An approval gate's outcome."""

    approved: bool
    who: str
    reason: str

    def describe(self) -> str:
        """One line for the step's message."""
        verb = "approved" if self.approved else "rejected"
        return f"{verb} by {self.who}" + (f": {self.reason}" if self.reason else "")


@dataclass(frozen=True)
class Selection:
    """The matrix child `mle/select` picked."""

    step_id: str
    value: float
    outputs: Mapping[str, OutputFile]
    metrics: Mapping[str, Any]


def operator_name() -> str:
    """Who is deciding: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def truthy(value: object) -> bool:
    """A `with:` flag: true, "true", "yes", "1", "on"."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


async def wait_for_decision(
    ledger: Ledger, run_id: str, step_id: str, poll: float, stop: Callable[[], bool]
) -> Decision | None:
    """Wait until the gate is approved or rejected in the ledger; None when stop() turns true."""
    while not stop():
        row = queries.approval(ledger, run_id, step_id)
        if row is not None:
            return Decision(row["decision"] == "approved", row["who"], row["reason"] or "")
        await asyncio.sleep(poll)
    return None


def select_child(
    plan: Plan,
    step: Step,
    options: Mapping[str, Any],
    found: Mapping[str, tuple[Mapping[str, OutputFile], Mapping[str, Any]]],
) -> Selection:
    """The needed matrix child with the best metric (first one on a tie).

    `found` maps each succeeded need to its outputs and metrics.
    """
    metric = str(options["metric"])
    lowest = str(options.get("mode", "max")) == "min"
    best: Selection | None = None
    for need in step.needs:
        if need not in found or not plan.step(need).group:
            continue
        outputs, metrics = found[need]
        value = _number(step, need, metric, metrics)
        if best is None or (value < best.value if lowest else value > best.value):
            best = Selection(need, value, outputs, metrics)
    if best is None:
        raise _error(step, "no matrix step it needs succeeded; nothing to select")
    return best


def _number(step: Step, need: str, metric: str, metrics: Mapping[str, Any]) -> float:
    if metric not in metrics:
        known = ", ".join(sorted(metrics)) or "none"
        raise _error(step, f"{need} has no metric {metric!r} (its metrics: {known})")
    value = metrics[metric]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _error(step, f"{need}: metric {metric!r} is {value!r}, not a number")
    return float(value)


def _error(step: Step, message: str) -> RecipeError:
    where = step.location
    return RecipeError(
        message, file=where.file, line=where.line, col=where.col, key=f"steps.{step.id}.with"
    )
