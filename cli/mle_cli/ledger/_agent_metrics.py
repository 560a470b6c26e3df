"""Agents' heartbeats in the ledger: one row per beat (cpu, load, memory, disk, temperature, tasks),
capped per agent so that an always-on `mle top` does not grow the ledger forever."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING

from mle_cli.ledger._ledger import Ledger, Row

if TYPE_CHECKING:
    from mle_cli.ledger._writer import LedgerWriter
    from mle_proto.v1.agent_pb2 import AgentHeartbeat

__all__ = [
    "KEEP_ROWS",
    "MetricSample",
    "heartbeat_recorder",
    "heartbeat_row",
    "latest_metrics",
    "metrics_series",
    "record_heartbeats",
]

# Rows kept per agent: about 5.5 hours of heartbeats at the default 2 s interval.
KEEP_ROWS = 10_000


@dataclass(frozen=True)
class MetricSample:
    """One heartbeat of one agent, as stored in `agent_metrics`."""

    agent: str
    time: float  # the operator's clock when the beat arrived
    boot_id: str
    cpu_percent: float
    load1: float
    memory_used: int
    memory_total: int
    disk_free: int
    temperature: float | None  # °C; None when the board has no sensor
    running_tasks: int
    slots: int


_INSERT = """
INSERT INTO agent_metrics (agent, time, boot_id, cpu_percent, load1, memory_used, memory_total,
    disk_free, temperature, running_tasks, slots)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
# The index (agent, time) holds the rowid too, so this walks the index only.
_PRUNE = """
DELETE FROM agent_metrics WHERE rowid IN (
    SELECT rowid FROM agent_metrics WHERE agent = ?
    ORDER BY time DESC, rowid DESC LIMIT -1 OFFSET ?
)
"""
_LATEST = """
SELECT m.* FROM agent_metrics AS m
JOIN (SELECT agent, MAX(time) AS time FROM agent_metrics GROUP BY agent) AS last
    ON m.agent = last.agent AND m.time = last.time
ORDER BY m.agent, m.rowid
"""


def heartbeat_row(agent: str, beat: AgentHeartbeat, received: float | None = None) -> MetricSample:
    """The ledger row of a heartbeat from the target named `agent`, received now (or then)."""
    temperature = beat.temperature_celsius if beat.HasField("temperature_celsius") else None
    return MetricSample(
        agent=agent,
        time=time.time() if received is None else received,
        boot_id=beat.boot_id,
        cpu_percent=beat.cpu_percent,
        load1=beat.load1,
        memory_used=beat.memory_used_bytes,
        memory_total=beat.memory_total_bytes,
        disk_free=beat.disk_free_bytes,
        temperature=temperature,
        running_tasks=beat.running_tasks,
        slots=beat.slots,
    )


def record_heartbeats(ledger: Ledger, rows: Iterable[MetricSample], keep: int = KEEP_ROWS) -> int:
    """Append the rows, then drop each of their agents' rows beyond the newest `keep`; return
    how many rows were appended."""
    rows = list(rows)
    if not rows:
        return 0
    with ledger.transaction():
        ledger.conn.executemany(_INSERT, [astuple(row) for row in rows])
        for agent in sorted({row.agent for row in rows}):
            ledger.conn.execute(_PRUNE, (agent, max(1, keep)))
    return len(rows)


def heartbeat_recorder(
    writer: LedgerWriter, agent: str, keep: int = KEEP_ROWS
) -> Callable[[AgentHeartbeat], None]:
    """An `AgentConnection.on_heartbeat` hook that records each beat through the writer."""

    def record(beat: AgentHeartbeat) -> None:
        row = heartbeat_row(agent, beat)
        writer.submit(lambda ledger: _record(ledger, row, keep))

    return record


def latest_metrics(ledger: Ledger) -> dict[str, Row]:
    """Each agent's newest row, by agent name."""
    return {row["agent"]: row for row in _rows(ledger, _LATEST, ())}


def metrics_series(ledger: Ledger, agent: str, since: float = 0.0) -> list[Row]:
    """An agent's rows received at or after `since` (unix seconds), oldest first."""
    sql = "SELECT * FROM agent_metrics WHERE agent = ? AND time >= ? ORDER BY time, rowid"
    return _rows(ledger, sql, (agent, since))


def _record(ledger: Ledger, row: MetricSample, keep: int) -> None:
    record_heartbeats(ledger, [row], keep)


def _rows(ledger: Ledger, sql: str, args: tuple[object, ...]) -> list[Row]:
    cursor = ledger.conn.execute(sql, args)
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, values, strict=True)) for values in cursor]
