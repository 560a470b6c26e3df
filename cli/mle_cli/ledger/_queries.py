"""Reads behind resume, the step cache and approval gates."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from mle_cli.ledger._ledger import Ledger, Row
from mle_cli.states import Status

__all__ = ["approval", "cache_candidates", "last_cache_parts", "metrics", "step_outputs"]


def metrics(ledger: Ledger, run_id: str) -> dict[str, dict[str, Any]]:
    """Every recorded metric of a run: step id -> name -> value."""
    found: dict[str, dict[str, Any]] = {}
    for row in ledger.query(
        "SELECT step_id, name, text FROM metrics WHERE run_id = ? ORDER BY rowid", [run_id]
    ):
        found.setdefault(row["step_id"], {})[row["name"]] = json.loads(row["text"])
    return found


def step_outputs(ledger: Ledger, run_id: str, step_id: str) -> list[Row]:
    """The recorded outputs (path, digest, size) of one step."""
    return list(
        ledger.query(
            "SELECT path, digest, size FROM artifacts WHERE run_id = ? AND step_id = ? "
            "ORDER BY path",
            [run_id, step_id],
        )
    )


def approval(ledger: Ledger, run_id: str, step_id: str) -> Row | None:
    """The decision recorded for an approval gate, if any."""
    rows = list(
        ledger.query("SELECT * FROM approvals WHERE run_id = ? AND step_id = ?", [run_id, step_id])
    )
    return rows[0] if rows else None


def cache_candidates(ledger: Ledger, cache_key: str, limit: int = 20) -> Iterator[Row]:
    """Succeeded (or cached) steps with this cache key, newest first."""
    yield from ledger.query(
        "SELECT run_id, step_id FROM steps WHERE cache_key = ? AND status IN (?, ?) "
        "ORDER BY finished DESC LIMIT ?",
        [cache_key, Status.SUCCEEDED, Status.CACHED, limit],
    )


def last_cache_parts(ledger: Ledger, recipe: str, step_id: str) -> dict[str, Any] | None:
    """What the cache key of the latest successful run of this step was made of."""
    rows = list(
        ledger.query(
            "SELECT s.cache_parts FROM steps s JOIN runs r ON r.id = s.run_id "
            "WHERE r.recipe = ? AND s.step_id = ? AND s.cache_parts IS NOT NULL "
            "AND s.status IN (?, ?) ORDER BY s.finished DESC LIMIT 1",
            [recipe, step_id, Status.SUCCEEDED, Status.CACHED],
        )
    )
    return json.loads(rows[0]["cache_parts"]) if rows else None
