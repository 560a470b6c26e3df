"""The operator's SQLite ledger: source of truth for runs, steps, attempts, events, artifacts."""

from __future__ import annotations

from mle_cli.ledger import _queries as queries
from mle_cli.ledger._ledger import ArtifactRecord, EventRecord, Ledger, LedgerError
from mle_cli.ledger._writer import LedgerWriter

__all__ = ["ArtifactRecord", "EventRecord", "Ledger", "LedgerError", "LedgerWriter", "queries"]
