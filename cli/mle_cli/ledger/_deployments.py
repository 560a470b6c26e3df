"""Model deployments in the ledger: every deploy and route change, lineage, stats snapshots."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mle_cli.ledger._ledger import Ledger, Row

__all__ = [
    "ACTIONS",
    "DeploymentRecord",
    "artifact_source",
    "deployments",
    "record_deployment",
    "record_model_stats",
    "stats_scope",
]

ACTIONS = ("deploy", "route", "rollback", "undeploy")


@dataclass(frozen=True)
class DeploymentRecord:
    """One successful deploy or route change on one agent."""

    target: str
    agent: str
    model: str
    action: str  # one of ACTIONS
    operator: str
    version: int | None = None  # deploy: the version; route: the primary afterwards
    digest: str = ""
    runtime: str = ""
    filename: str = ""
    size: int | None = None
    uploaded: int = 0  # bytes sent to the agent (0: it already held the file)
    route: Mapping[str, Any] | None = None
    created: bool = False
    source_run: str = ""
    source_step: str = ""
    time: float = field(default_factory=time.time)


def record_deployment(ledger: Ledger, record: DeploymentRecord) -> int:
    """Insert a deployment row; return its id."""
    if record.action not in ACTIONS:
        raise ValueError(f"unknown deployment action {record.action!r}")
    cursor = ledger.conn.execute(
        "INSERT INTO deployments (time, target, agent, model, version, digest, runtime, "
        "filename, size, uploaded, action, route, created, source_run, source_step, operator) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            record.time,
            record.target,
            record.agent,
            record.model,
            record.version,
            record.digest or None,
            record.runtime or None,
            record.filename or None,
            record.size,
            record.uploaded,
            record.action,
            json.dumps(record.route, sort_keys=True) if record.route is not None else None,
            int(record.created),
            record.source_run or None,
            record.source_step or None,
            record.operator,
        ),
    )
    return int(cursor.lastrowid or 0)


def deployments(
    ledger: Ledger, *, target: str | None = None, model: str | None = None
) -> list[Row]:
    """Deployment rows, oldest first, optionally of one target and/or model; route decoded."""
    sql = "SELECT * FROM deployments WHERE 1 = 1"
    args: list[str] = []
    if target is not None:
        sql += " AND target = ?"
        args.append(target)
    if model is not None:
        sql += " AND model = ?"
        args.append(model)
    rows = list(ledger.db.query(sql + " ORDER BY id", args))
    for row in rows:
        row["route"] = json.loads(row["route"]) if row["route"] else None
        row["created"] = bool(row["created"])
    return rows


def artifact_source(ledger: Ledger, digest: str) -> tuple[str, str] | None:
    """The run and step that last produced an artifact with this digest, if any did."""
    row = ledger.conn.execute(
        "SELECT run_id, step_id FROM artifacts WHERE digest = ? ORDER BY created DESC LIMIT 1",
        (digest,),
    ).fetchone()
    return None if row is None else (str(row[0]), str(row[1]))


def stats_scope(target: str, model: str, version: int) -> tuple[str, str]:
    """The (run_id, step_id) pair a model version's stats are filed under in `metrics`.

    Metrics rows are keyed by run and step; a served version is neither, so its stats use a
    `model:` prefix no run id can have (run ids start with a date).
    """
    return f"model:{target}/{model}", f"v{version}"


def record_model_stats(
    ledger: Ledger, target: str, model: str, version: int, stats: Mapping[str, float]
) -> None:
    """Keep the latest stats snapshot of a model version in the metrics table."""
    run_id, step_id = stats_scope(target, model, version)
    ledger.record_metrics(run_id, step_id, {**stats, "snapshot_time": time.time()})
