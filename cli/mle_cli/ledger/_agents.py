"""Agents found by mDNS, cached in the ledger: upserted when seen, aged to "gone", forgotten once
unseen for long, and bounded in number (any host on the LAN can announce names by the thousand)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from mle_cli.ledger._ledger import Ledger, Row

if TYPE_CHECKING:
    from mle_cli.targets.discovery import DiscoveredAgent

__all__ = ["MAX_AGENTS", "STATES", "discovered_agents", "record_discovered"]

STATES = ("up", "gone")
MAX_AGENTS = 1000  # cached rows kept; those seen longest ago go first

_UPSERT = """
INSERT INTO discovered_agents (name, address, port, arch, os, runtimes, labels, fingerprint,
    version, source, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (name) DO UPDATE SET
    address = excluded.address, port = excluded.port, arch = excluded.arch, os = excluded.os,
    runtimes = excluded.runtimes, labels = excluded.labels, fingerprint = excluded.fingerprint,
    version = excluded.version, source = excluded.source,
    last_seen = MAX(last_seen, excluded.last_seen)
"""
_FORGET = "DELETE FROM discovered_agents WHERE last_seen < ?"
_KEEP_NEWEST = """
DELETE FROM discovered_agents WHERE name NOT IN (
    SELECT name FROM discovered_agents ORDER BY last_seen DESC, name LIMIT ?)
"""


def record_discovered(
    ledger: Ledger,
    agents: Iterable[DiscoveredAgent],
    source: str = "mdns",
    *,
    forget_after: float | None = None,
    keep: int = MAX_AGENTS,
    now: float | None = None,
) -> int:
    """Insert or refresh the agents just seen, then drop the rows unseen for `forget_after`
    seconds (None: none) and all but the `keep` seen most recently; return how many were seen."""
    rows = [_row(agent, source) for agent in agents]
    now = time.time() if now is None else now
    with ledger.transaction():
        ledger.conn.executemany(_UPSERT, rows)
        if forget_after is not None:
            ledger.conn.execute(_FORGET, (now - forget_after,))
        ledger.conn.execute(_KEEP_NEWEST, (max(0, keep),))
    return len(rows)


def discovered_agents(ledger: Ledger, gone_after: float, now: float | None = None) -> list[Row]:
    """Every cached agent by name, with `state` up or gone (unseen for `gone_after` seconds)."""
    now = time.time() if now is None else now
    cursor = ledger.conn.execute("SELECT * FROM discovered_agents ORDER BY name")
    columns = [d[0] for d in cursor.description]
    rows = [dict(zip(columns, values, strict=True)) for values in cursor]
    for row in rows:
        row["runtimes"] = json.loads(row["runtimes"])
        row["labels"] = json.loads(row["labels"])
        row["state"] = "gone" if now - row["last_seen"] > gone_after else "up"
    return rows


def _row(agent: DiscoveredAgent, source: str) -> tuple[object, ...]:
    return (
        agent.name,
        agent.address,
        agent.port,
        agent.arch,
        agent.os,
        json.dumps(list(agent.runtimes)),
        json.dumps(dict(agent.labels), sort_keys=True),
        agent.fingerprint,
        agent.version,
        source,
        agent.last_seen,
        agent.last_seen,
    )
