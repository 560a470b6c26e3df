"""The states a run, step or attempt can be in, as recorded in the ledger and shown to users."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FINAL", "Status"]


class Status(StrEnum):
    """Lifecycle of runs, steps and attempts."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    WAITING = "waiting"  # an approval gate waits for `mle approve`
    SUCCEEDED = "succeeded"
    CACHED = "cached"  # succeeded earlier with the same cache key: outputs reused, not run
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed-out"
    SKIPPED = "skipped"
    LOST = "lost"
    DETACHED = "detached"


# Nothing more will happen to a run, step or attempt in one of these states (a step resumed later
# gets new attempts).
FINAL = frozenset(
    {
        Status.SUCCEEDED,
        Status.CACHED,
        Status.FAILED,
        Status.CANCELLED,
        Status.TIMED_OUT,
        Status.SKIPPED,
        Status.LOST,
    }
)
