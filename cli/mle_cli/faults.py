"""Crash points for fault tests: `MLE_FAULT=<point>` makes this process SIGKILL itself there.

The fault tests kill `mle run` at exact moments of a run (after an attempt is recorded, after
its task started, between a task's result and its ledger commit...) and check that `mle resume`
converges. Outside those tests the variable is unset and a point costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "point"]

POINTS = (
    "run-created",
    "attempt-recorded",
    "task-started",
    "result-received",
    "result-committed",
    "step-finished",
)


def point(name: str) -> None:
    """Die here, like a `kill -9`, when the fault tests ask for it."""
    if os.environ.get("MLE_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
