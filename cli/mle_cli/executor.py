"""What the scheduler needs from whatever runs a task: the executor interface.

The scheduler talks only to this interface; the gRPC agent is one implementation, and a Ray or
Kubernetes executor can be another without touching the scheduler or recipes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from mle_cli.states import Status
from mle_proto.store import ArtifactStore

__all__ = ["Executor", "OutputFile", "TaskRequest", "TaskUpdate"]


@dataclass(frozen=True)
class TaskRequest:
    """One attempt of a step, fully rendered."""

    task_id: str
    run_id: str
    step: str
    attempt: int
    shell: str | None
    argv: tuple[str, ...] | None
    env: Mapping[str, str]
    inputs: Mapping[str, str]  # work-dir path -> digest
    outputs: tuple[str, ...]
    timeout: float | None


@dataclass(frozen=True)
class OutputFile:
    """An output produced by a task, stored by digest."""

    path: str
    digest: str
    size: int


@dataclass(frozen=True)
class TaskUpdate:
    """One event of a task. kind is `state`, `log` or `result` (the last one)."""

    seq: int
    time: float
    kind: str
    state: str = ""  # for state/result: pending, staging, running, succeeded, failed...
    stream: str = ""  # for log: stdout | stderr
    text: str = ""  # log line, or state/result message
    exit_code: int | None = None
    outputs: tuple[OutputFile, ...] = field(default=())

    @property
    def status(self) -> Status:
        """The final status a result event reports."""
        return Status(self.state)


class Executor(Protocol):
    """Runs tasks somewhere and reports their events."""

    name: str
    address: str
    platform: str  # platform class for the step cache, e.g. "linux-x86_64"

    def silent_for(self) -> float:
        """Seconds since the executor last showed it is alive (0 while it is)."""
        ...

    def slot(self) -> AbstractAsyncContextManager[None]:
        """Held while an attempt runs, so no executor gets more tasks than it has slots."""
        ...

    async def ship(self, digests: Iterable[str], store: ArtifactStore) -> None:
        """Make sure the executor has these artifacts, sending the missing ones from store."""
        ...

    async def start(self, request: TaskRequest) -> None:
        """Start the task (idempotent on task_id)."""
        ...

    def run(self, request: TaskRequest) -> AsyncIterator[TaskUpdate]:
        """Start the task (idempotent on its id) and stream its events from the first, live,
        ending with the result. Errors before the first event are `start`'s."""
        ...

    def watch(self, task_id: str, after_seq: int) -> AsyncIterator[TaskUpdate]:
        """Events after after_seq, live, ending with the result."""
        ...

    async def cancel(self, task_id: str, reason: str) -> None:
        """Kill the task."""
        ...

    async def fetch(self, digests: Iterable[str], store: ArtifactStore) -> None:
        """Copy artifacts the store lacks from the executor into store."""
        ...

    async def ack(self, acks: Mapping[str, int]) -> None:
        """Each task's events up to its seq are durably recorded and may be pruned."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
