"""Attempts of a task step: dispatch to an executor, follow its events, detect a lost agent.

An attempt whose agent stays silent past the grace period is declared LOST and fenced in the
ledger before anything else happens, so the step can be retried. The lost task may still be
alive behind a partition: its later events are recorded, and its late result is noted on the
fenced attempt, but it can never change the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from mle_cli import faults
from mle_cli.executor import Executor, TaskRequest, TaskUpdate
from mle_cli.ledger import EventRecord, Ledger, LedgerWriter
from mle_cli.states import Status
from mle_proto.errors import AgentUnavailable, MleError

__all__ = ["AttemptRunner", "LogSink"]

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[str], Awaitable[Executor]]
LogSink = Callable[[str, str, str], None]  # step id, stream, text

_RETRY_WATCH = 0.2  # seconds between attempts to re-open a broken event stream
_LATE_RETRY = 1.0  # the same, for a fenced attempt that may come back
_ACK_LINGER = 0.1  # seconds an ack waits for others to go out with it
_ACK_BATCH = 500  # acks per call at most (a small control message)


def result(status: Status, text: str, seq: int = 0) -> TaskUpdate:
    """A result made up on this side: the task could not run, or could not be followed."""
    return TaskUpdate(seq, time.time(), "result", state=status, text=text)


class AttemptRunner:
    """Runs attempts for one run and keeps track of the tasks they started."""

    def __init__(
        self,
        run_id: str,
        *,
        executor_for: ExecutorFactory,
        writer: LedgerWriter,
        on_log: LogSink,
        agent_grace: float,
    ) -> None:
        self.run_id = run_id
        self._executor_for = executor_for
        self._writer = writer
        self._on_log = on_log
        self._grace = agent_grace
        self._check = max(0.05, min(1.0, agent_grace / 5))
        self._running: dict[str, tuple[Executor, str]] = {}  # task id -> executor
        self._late: dict[str, asyncio.Task[None]] = {}  # fenced task id -> its follower
        self._background: set[asyncio.Task[None]] = set()
        self._acks: dict[Executor, dict[str, int]] = {}  # task id -> seq, per executor
        self._acker: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._cancel_reason = ""

    @property
    def running(self) -> list[tuple[Executor, str]]:
        """Executors and task ids of attempts in flight."""
        return list(self._running.values())

    async def run(
        self,
        executor: Executor,
        request: TaskRequest,
        *,
        after_seq: int | None = None,
        started: Callable[[], None] = lambda: None,
    ) -> TaskUpdate:
        """Run one attempt to its result. With after_seq, re-attach to an attempt the ledger
        already holds (its task may or may not have reached the agent: start is idempotent)."""
        task_id = request.task_id
        if after_seq is None:
            self._write(
                lambda led: led.start_attempt(
                    task_id,
                    self.run_id,
                    request.step,
                    request.attempt,
                    executor.name,
                    executor.address,
                )
            )
            await self._writer.flush()  # the attempt is on record before its task exists
            faults.point("attempt-recorded")
        self._running[task_id] = (executor, task_id)
        started()
        try:
            if after_seq is not None:  # its task may or may not have reached the agent
                await executor.start(request)
                await self._on_started(executor, task_id)
            update = await self._follow(executor, request, after_seq)
        except MleError as e:  # it cannot be started or followed: close it, stop its task
            update = result(Status.FAILED, str(e))
            self._write(lambda led: _finish(led, task_id, update))
            await self.cancel_quietly(executor, task_id, f"attempt abandoned: {e}")
        finally:
            self._running.pop(task_id, None)
        if update.status == Status.LOST:
            await self._fence(executor, request, update)
        return update

    async def _on_started(self, executor: Executor, task_id: str) -> None:
        faults.point("task-started")
        if self._cancel_reason:  # the run was cancelled while the task was starting
            await self.cancel_quietly(executor, task_id, self._cancel_reason)

    async def _follow(
        self, executor: Executor, request: TaskRequest, after: int | None
    ) -> TaskUpdate:
        """Start the task unless `after` says it was (then follow it from there), and record its
        events until its result, unless its agent goes silent too long."""
        seen = [after or 0]
        watcher = asyncio.create_task(self._watch(executor, request, seen, fresh=after is None))
        try:
            while True:
                done, _ = await asyncio.wait({watcher}, timeout=self._check)
                if done:
                    return watcher.result()
                if executor.silent_for() > self._grace:
                    message = f"agent {executor.name} silent for {self._grace:g}s"
                    return result(Status.LOST, message, seen[0])
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(
        self, executor: Executor, request: TaskRequest, seen: list[int], *, fresh: bool
    ) -> TaskUpdate:
        failing_since: float | None = None
        while True:
            try:
                stream = (
                    executor.run(request) if fresh else executor.watch(request.task_id, seen[0])
                )
                async for update in stream:
                    if fresh:  # its first event: the agent has the task
                        fresh = False
                        await self._on_started(executor, request.task_id)
                    failing_since = None
                    seen[0] = max(seen[0], update.seq)
                    if update.kind == "result":
                        faults.point("result-received")
                    self.record(request, update)
                    if update.kind == "result":
                        self._ack_later(executor, request.task_id, update.seq)
                        return update
            except AgentUnavailable as e:
                if fresh:  # never started: the attempt fails at once, as a refused start does
                    raise
                failing_since = failing_since or time.monotonic()
                # Without heartbeats (silent_for stays 0), a stream failing this long is a loss.
                if time.monotonic() - failing_since > self._grace:
                    message = f"agent {executor.name} silent for {self._grace:g}s: {e}"
                    return result(Status.LOST, message, seen[0])
            await asyncio.sleep(_RETRY_WATCH)

    def record(self, request: TaskRequest, update: TaskUpdate) -> None:
        """Queue an event for the ledger; a result also closes its attempt in the same batch."""
        event = EventRecord(
            task_id=request.task_id,
            seq=update.seq,
            run_id=self.run_id,
            step_id=request.step,
            time=update.time,
            kind=update.kind,
            stream=update.stream or None,
            state=update.state or None,
            text=update.text,
        )

        def write(led: Ledger) -> None:
            led.record_events([event])
            if update.kind == "result":
                _finish(led, request.task_id, update)

        self._write(write)
        if update.kind == "log":
            self._on_log(request.step, update.stream, update.text)

    async def _fence(self, executor: Executor, request: TaskRequest, update: TaskUpdate) -> None:
        task_id = request.task_id
        self._write(lambda led: led.fence_attempt(task_id, update.text, update.time))
        await self._writer.flush()  # fenced on record before any other attempt starts
        follower = asyncio.create_task(self._follow_late(executor.name, request, update.seq))
        self._late[task_id] = follower

    async def _follow_late(self, target: str, request: TaskRequest, after: int) -> None:
        """Record what a fenced attempt still reports, should its agent come back."""
        seen = [after]
        while True:
            try:
                executor = await self._executor_for(target)
                async for update in executor.watch(request.task_id, seen[0]):
                    seen[0] = max(seen[0], update.seq)
                    self.record(request, update)
                    if update.kind == "result":
                        self._ack_later(executor, request.task_id, update.seq)
                        return
            except MleError as e:
                log.debug("late follow of %s: %s", request.task_id, e)
            await asyncio.sleep(_LATE_RETRY)

    def _ack_later(self, executor: Executor, task_id: str, seq: int) -> None:
        """Acknowledge a task's events once the ledger holds them. Acks linger a moment and go
        out together, one call per agent: an RPC per task cost a fifth of a short step."""
        self._acks.setdefault(executor, {})[task_id] = seq
        if self._acker is None or self._acker.done():
            self._acker = asyncio.create_task(self._send_acks())
            self._background.add(self._acker)
            self._acker.add_done_callback(self._background.discard)

    async def _send_acks(self) -> None:
        while self._acks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), _ACK_LINGER)
            batches, self._acks = self._acks, {}
            await self._writer.flush()  # only acknowledge what the ledger durably holds
            faults.point("result-committed")
            # Agents at once: one that does not answer must not hold up the others.
            await asyncio.gather(*(self._send(e, acks) for e, acks in batches.items()))

    async def _send(self, executor: Executor, acks: dict[str, int]) -> None:
        items = list(acks.items())
        try:
            for start in range(0, len(items), _ACK_BATCH):
                await executor.ack(dict(items[start : start + _ACK_BATCH]))
        except MleError as e:  # the events stay on the agent: the safe direction
            log.debug("acks to %s failed: %s", executor.name, e)

    async def cancel_running(self, reason: str) -> None:
        """Cancel every attempt in flight, and any that is starting."""
        self._cancel_reason = reason
        for executor, task_id in self.running:
            await self.cancel_quietly(executor, task_id, reason)

    async def cancel_quietly(self, executor: Executor, task_id: str, reason: str) -> None:
        """Cancel a task, best effort: the agent may be gone, or never got the task."""
        try:
            await executor.cancel(task_id, reason)
        except MleError as e:
            log.debug("could not cancel %s on %s: %s", task_id, executor.name, e)

    async def close(self) -> None:
        """Stop following fenced attempts and send pending acks at once."""
        self._closing.set()
        for follower in self._late.values():
            follower.cancel()
        await asyncio.gather(*self._late.values(), *self._background, return_exceptions=True)

    def _write(self, write: Callable[[Ledger], None]) -> None:
        self._writer.submit(write)


def _finish(ledger: Ledger, task_id: str, update: TaskUpdate) -> None:
    ledger.finish_attempt(
        task_id,
        status=update.state or Status.FAILED,
        exit_code=update.exit_code,
        message=update.text,
        finished=update.time,
        outputs=[asdict(o) for o in update.outputs],
    )
