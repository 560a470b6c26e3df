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
    "STATS",
    "DeploymentRecord",
    "artifact_source",
    "deployments",
    "record_deployment",
    "record_model_stats",
]

ACTIONS = ("deploy", "route", "rollback", "undeploy")
# The per-version stats kept in model_stats (VersionStats field names).
STATS = (
    "requests",
    "errors",
    "p50_seconds",
    "p95_seconds",
    "p99_seconds",
    "batches",
    "shadow_requests",
    "disagreements",
    "fallbacks",
    "since",
)


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
    rows = list(ledger.query(sql + " ORDER BY id", args))
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


def record_model_stats(
    ledger: Ledger,
    target: str,
    model: str,
    version: int,
    stats: Mapping[str, float],
    at: float | None = None,
) -> None:
    """Append a stats snapshot of a model version read at `at` (default: now); its counters are
    totals since `since`."""
    ledger.conn.execute(
        "INSERT INTO model_stats (time, target, model, version, requests, errors, p50_seconds, "
        "p95_seconds, p99_seconds, batches, shadow_requests, disagreements, fallbacks, since) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (at or time.time(), target, model, version, *(stats.get(c) for c in STATS)),
    )
