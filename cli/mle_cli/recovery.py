"""What the ledger knows about a run that is being resumed: the state the scheduler starts from."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mle_cli.executor import OutputFile
from mle_cli.ledger import Ledger, queries
from mle_cli.states import FINAL, Status

__all__ = ["PriorAttempt", "PriorStep", "load_prior"]


@dataclass(frozen=True)
class PriorAttempt:
    """An attempt the ledger holds."""

    task_id: str
    attempt: int
    agent: str
    status: Status
    last_seq: int
    fenced: bool
    exit_code: int | None
    message: str
    finished: float | None
    outputs: tuple[OutputFile, ...]

    @property
    def unfinished(self) -> bool:
        """Dispatched and not known to have ended: its task may still run on its agent."""
        return not self.fenced and self.status not in FINAL


@dataclass(frozen=True)
class PriorStep:
    """A step as the ledger holds it."""

    step_id: str
    status: Status
    message: str
    exit_code: int | None
    started: float | None
    finished: float | None
    outputs: Mapping[str, OutputFile]
    metrics: Mapping[str, Any]
    attempts: tuple[PriorAttempt, ...] = field(default=())

    @property
    def done(self) -> bool:
        """Succeeded (or cached): it never runs again."""
        return self.status in (Status.SUCCEEDED, Status.CACHED)


def load_prior(ledger: Ledger, run_id: str) -> dict[str, PriorStep]:
    """Every step of a run with its attempts, outputs and metrics."""
    metrics = queries.metrics(ledger, run_id)
    outputs: dict[str, dict[str, OutputFile]] = {}
    for row in ledger.artifacts(run_id):
        outputs.setdefault(row["step_id"], {})[row["path"]] = _output(row)
    attempts: dict[str, list[PriorAttempt]] = {}
    for row in ledger.attempts(run_id):
        attempts.setdefault(row["step_id"], []).append(_attempt(row))
    return {
        row["step_id"]: PriorStep(
            step_id=row["step_id"],
            status=Status(row["status"]),
            message=row["message"] or "",
            exit_code=row["exit_code"],
            started=row["started"],
            finished=row["finished"],
            outputs=outputs.get(row["step_id"], {}),
            metrics=metrics.get(row["step_id"], {}),
            attempts=tuple(attempts.get(row["step_id"], [])),
        )
        for row in ledger.steps(run_id)
    }


def _attempt(row: Mapping[str, Any]) -> PriorAttempt:
    return PriorAttempt(
        task_id=row["task_id"],
        attempt=row["attempt"],
        agent=row["agent"],
        status=Status(row["status"]),
        last_seq=row["last_seq"],
        fenced=bool(row["fenced"]),
        exit_code=row["exit_code"],
        message=row["message"] or "",
        finished=row["finished"],
        outputs=tuple(_output(o) for o in json.loads(row["outputs"] or "[]")),
    )


def _output(row: Mapping[str, Any]) -> OutputFile:
    return OutputFile(str(row["path"]), str(row["digest"]), int(row["size"]))
