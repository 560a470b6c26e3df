"""The operator's SQLite ledger: source of truth for runs, steps, attempts, events, artifacts and
model deployments, the agents discovered on the network, and their heartbeats' metrics."""

from __future__ import annotations

from mle_cli.ledger import _agent_metrics as agent_metrics
from mle_cli.ledger import _agents as agents
from mle_cli.ledger import _deployments as deployments
from mle_cli.ledger import _queries as queries
from mle_cli.ledger._deployments import DeploymentRecord
from mle_cli.ledger._ledger import ArtifactRecord, EventRecord, Ledger, LedgerError
from mle_cli.ledger._writer import LedgerWriter

__all__ = [
    "ArtifactRecord",
    "DeploymentRecord",
    "EventRecord",
    "Ledger",
    "LedgerError",
    "LedgerWriter",
    "agent_metrics",
    "agents",
    "deployments",
    "queries",
]
