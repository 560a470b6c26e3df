"""What the ledger says about past runs, shaped for `mle runs`, `mle show` and `mle logs`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from mle_cli.ledger import Ledger
from mle_cli.settings import Settings
from mle_cli.states import FINAL, Status
from mle_proto.errors import NotFound
from mle_proto.store import ArtifactStore

__all__ = ["follow_logs", "run_detail", "run_list"]

_FAILED = {Status.FAILED, Status.TIMED_OUT, Status.LOST}
_TAIL = 10


def run_list(ledger: Ledger, limit: int) -> list[dict[str, Any]]:
    """The latest runs with their durations."""
    rows = ledger.runs(limit)
    for row in rows:
        row["duration"] = _elapsed(row)
    return rows


def run_detail(ledger: Ledger, settings: Settings, run_ref: str | None) -> dict[str, Any]:
    """A run with its steps, attempts, outputs (and where they are stored), failures and the
    deployments of the models it produced."""
    run_id = ledger.resolve_run(run_ref)
    run = ledger.run(run_id)
    run["duration"] = _elapsed(run)
    steps = ledger.steps(run_id)
    attempts = ledger.attempts(run_id)
    store = ArtifactStore(settings.artifacts_dir)
    outputs = ledger.artifacts(run_id)
    for output in outputs:
        stored = store.path_of(output["digest"])
        output["stored"] = _relative(stored, settings)
        output["present"] = stored.exists()
    for attempt in attempts:
        attempt["duration"] = _elapsed(attempt)
    for step in steps:
        step["duration"] = _elapsed(step)
        step["attempt_history"] = [a for a in attempts if a["step_id"] == step["step_id"]]
        if step["status"] in _FAILED:
            step["last_lines"] = _last_lines(ledger, step["attempt_history"])
    run["steps"] = steps
    run["outputs"] = outputs
    run["failed"] = [_failure(s) for s in steps if s["status"] in _FAILED]
    run["models"] = _models(ledger, run_id)
    return run


def follow_logs(
    ledger: Ledger, run_id: str, step_id: str | None, follow: bool, poll: float = 0.3
) -> Iterator[dict[str, Any]]:
    """Log lines of a run in order; with follow, keep going until the run is final."""
    if step_id is not None and step_id not in {s["step_id"] for s in ledger.steps(run_id)}:
        raise NotFound(f"run {run_id} has no step {step_id!r}")
    cursor = 0
    while True:
        for row in ledger.logs(run_id, step_id, after=cursor):
            cursor = row["cursor"]
            yield row
        if not follow or ledger.run(run_id)["status"] in {*FINAL, Status.DETACHED}:
            if follow:  # one last read: lines committed just before the final status
                for row in ledger.logs(run_id, step_id, after=cursor):
                    yield row
            return
        time.sleep(poll)


def _models(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """Deployments of the files the run produced (lazy: the models package pulls in grpc)."""
    from mle_cli.models.lineage import run_models

    return run_models(ledger, run_id)


def _last_lines(ledger: Ledger, attempts: list[dict[str, Any]]) -> list[str]:
    """The last log lines of a step's last attempt (the one that decided its failure)."""
    if not attempts:
        return []
    rows = ledger.query(
        "SELECT text FROM events WHERE task_id = ? AND kind = 'log' ORDER BY seq DESC LIMIT ?",
        [attempts[-1]["task_id"], _TAIL],
    )
    return [r["text"] for r in rows][::-1]


def _failure(step: dict[str, Any]) -> dict[str, Any]:
    """What `mle show` says about a failed step."""
    last = step["attempt_history"][-1] if step["attempt_history"] else None
    return {
        "step_id": step["step_id"],
        "status": step["status"],
        "exit_code": step["exit_code"],
        "message": step["message"],
        "attempt": last["attempt"] if last else None,
        "agent": last["agent"] if last else "",
        "attempts": len(step["attempt_history"]),
        "last_lines": step["last_lines"],
    }


def _elapsed(row: dict[str, Any]) -> float | None:
    if not row.get("started"):
        return None
    end = row.get("finished") or time.time()
    return float(end - row["started"])


def _relative(path: Any, settings: Settings) -> str:
    try:
        return str(path.relative_to(settings.project_dir))
    except ValueError:
        return str(path)
