"""The task manager: accepts tasks, runs them in slots, records their events, feeds watchers.

A task runs in its own asyncio task, independent of any RPC: a client that disconnects changes
nothing. Cancellation, timeouts and shutdown all end in exactly one final TaskResult event. A task
also outlives the agent itself: a restarted agent re-adopts the processes still alive.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO

from mle_agent.events import TaskEvents
from mle_agent.execution import RESTART_MESSAGE, VANISHED_MESSAGE, Execution, LiveTask
from mle_agent.heartbeat import MachineSampler
from mle_agent.outbox import Outbox, ProcessRecord, State, TaskRow, state_name
from mle_agent.runner import TaskFiles, alive_as, kill_stale_task
from mle_agent.settings import AgentSettings
from mle_agent.specs import validate_spec
from mle_proto.errors import AlreadyExists, FailedPrecondition, NotFound
from mle_proto.store import ArtifactStore
from mle_proto.v1 import agent_pb2 as pb

__all__ = [
    "DRAIN_MESSAGE",
    "ENDED_MESSAGE",
    "READOPTED_MESSAGE",
    "REQUEUED_MESSAGE",
    "RESTART_MESSAGE",
    "VANISHED_MESSAGE",
    "TaskManager",
]

log = logging.getLogger(__name__)

DRAIN_MESSAGE = "agent shut down before the task finished"
READOPTED_MESSAGE = "re-adopted after agent restart"
ENDED_MESSAGE = "re-adopted after agent restart; it had ended meanwhile"
REQUEUED_MESSAGE = "re-queued after agent restart"
_ACTIVE = (pb.TASK_STATE_STAGING, pb.TASK_STATE_RUNNING)


class TaskManager:
    """Accepts, runs and reports tasks; the servicers' only way to touch them."""

    def __init__(
        self, settings: AgentSettings, outbox: Outbox, store: ArtifactStore, lock: IO[bytes]
    ) -> None:
        self.settings = settings
        self.store = store
        self.boot_id = str(uuid.uuid4())
        self.machine = MachineSampler(settings.data_dir)
        self._outbox = outbox
        self._lock = lock
        self._execution = Execution(settings, store, outbox)
        self._slots = asyncio.Semaphore(settings.slots)
        self._overdraft = 0  # re-adopted tasks running beyond the slots (fewer slots than before)
        self._live: dict[str, LiveTask] = {}
        self._draining = asyncio.Event()
        self._drain_listeners: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def open(cls, settings: AgentSettings) -> TaskManager:
        """Lock the data dir, open outbox and store, and settle tasks an earlier agent left.

        Call it from the event loop when an earlier agent may have left tasks: they resume at once.
        """
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = _lock_data_dir(settings.data_dir)
        try:
            manager = cls(
                settings, Outbox(settings.outbox_path), ArtifactStore(settings.artifacts_root), lock
            )
        except BaseException:
            lock.close()
            raise
        manager.recover()
        return manager

    @property
    def draining(self) -> bool:
        """Whether the agent has stopped accepting tasks."""
        return self._draining.is_set()

    @property
    def running_count(self) -> int:
        """Tasks staging or running right now."""
        return sum(1 for task in self._live.values() if task.events.state in _ACTIVE)

    def recover(self) -> int:
        """Settle every task an earlier agent left without a result; return how many there were.

        A live process is re-adopted, one that ended while no agent watched is concluded from the
        status and logs it left, a task waiting for a slot or staging is queued again; any other
        gets a FAILED result. Whatever happens is recorded as an event: nothing is forgotten.
        """
        rows = self._outbox.unfinished()
        _sweep(self.settings.task_root, keep={row.task_id for row in rows})
        adopted = 0
        for row in rows:
            if row.state != pb.TASK_STATE_RUNNING:
                task = self._revive(row, pb.TASK_STATE_PENDING, REQUEUED_MESSAGE)
                self._launch(task, self._execute(task))
            elif self._execution.files(row.task_id).exist():
                adopted += self._readopt(row)
            else:  # never spawned, or by an agent from before the shim: nothing to follow
                self._fail_lost(row)
        self._reserve_slots(adopted)
        return len(rows)

    async def start(self, spec: pb.TaskSpec) -> pb.TaskHandle:
        """Accept a task (idempotent on task_id) and schedule it."""
        validate_spec(spec)
        row = self._outbox.get(spec.task_id)
        if row is not None:
            if row.spec != spec:
                raise AlreadyExists(f"task {spec.task_id} already exists with a different spec")
            return pb.TaskHandle(task_id=spec.task_id, state=row.state, created=False)
        if self.draining:
            raise FailedPrecondition("agent is draining")
        for item in spec.inputs:
            if not self.store.has(item.digest):
                raise FailedPrecondition(
                    f"input {item.path}: artifact {item.digest} is not on this agent"
                )
        self._accept(spec)
        return pb.TaskHandle(task_id=spec.task_id, state=pb.TASK_STATE_PENDING, created=True)

    async def watch(self, task_id: str, after_seq: int) -> AsyncIterator[pb.TaskEvent]:
        """Replay a task's events after after_seq from the outbox, then follow them live."""
        if task_id not in self._live and self._outbox.get(task_id) is None:
            raise NotFound(f"task {task_id} is not on this agent")
        last = after_seq
        while True:
            live = self._live.get(task_id)
            changed = live.events.changed if live else None
            batch = self._outbox.events_after(task_id, last)
            for event in batch:
                yield event
                last = event.seq
                if event.HasField("result"):
                    return
            if batch:
                continue
            if changed is None:
                return  # finished, and its earlier events were acked and pruned
            await changed.wait()

    async def cancel(self, task_id: str, reason: str) -> pb.TaskHandle:
        """Stop a task, killing its process tree; a finished task is returned unchanged."""
        task = self._live.get(task_id)
        if task is not None and task.runner is not None:
            message = f"cancelled: {reason}" if reason else "cancelled"
            self._request_stop(task, pb.TASK_STATE_CANCELLED, message)
            grace = self.settings.kill_grace + 2 * self.settings.output_grace + 5.0
            await asyncio.wait({task.runner}, timeout=grace)
        row = self._outbox.get(task_id)
        if row is None:
            raise NotFound(f"task {task_id} is not on this agent")
        return pb.TaskHandle(task_id=task_id, state=row.state, created=False)

    def list_tasks(self, run_id: str = "") -> list[pb.TaskStatus]:
        """Every task the outbox knows, or those of one run."""
        return [row.status() for row in self._outbox.tasks(run_id)]

    def ack(self, task_id: str, upto_seq: int, more: Sequence[tuple[str, int]] = ()) -> int:
        """Record the operator's acks; return the first task's acked_seq. Only that task must
        exist: the others of a batch that are unknown (pruned, another agent's) are skipped."""
        acked = self._outbox.ack_many([(task_id, upto_seq), *more])[0]
        if acked is None:
            raise NotFound(f"task {task_id} is not on this agent")
        return acked

    async def heartbeats(self, interval: float) -> AsyncIterator[pb.AgentHeartbeat]:
        """One heartbeat at once, then one every interval, until the agent drains."""
        while True:
            beat = await self.machine.sample()
            beat.MergeFrom(
                pb.AgentHeartbeat(
                    name=self.settings.name,
                    boot_id=self.boot_id,
                    time=time.time(),
                    slots=self.settings.slots,
                    running_tasks=self.running_count,
                    task_ids=sorted(self._live),
                )
            )
            yield beat
            try:
                await asyncio.wait_for(self._draining.wait(), interval)
            except TimeoutError:
                continue
            return

    def on_drain(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Call listener once when draining starts (e.g. to report NOT_SERVING)."""
        self._drain_listeners.append(listener)

    async def drain(self, timeout: float) -> None:
        """Stop accepting tasks, let live ones finish up to timeout, then stop the rest."""
        if not self.draining:
            self._draining.set()
            for listener in self._drain_listeners:
                await listener()
        runners = self._runners()
        if runners:
            log.info("draining: waiting up to %gs for %d task(s)", timeout, len(runners))
            await asyncio.wait(runners, timeout=timeout)
        for task in list(self._live.values()):
            self._request_stop(task, pb.TASK_STATE_FAILED, DRAIN_MESSAGE)
        if runners := self._runners():
            await asyncio.wait(runners)

    def close(self) -> None:
        """Close the outbox and release the data dir (after drain)."""
        self.machine.close()
        self._outbox.close()
        self._lock.close()

    def _accept(self, spec: pb.TaskSpec) -> None:
        now = time.time()
        first = pb.TaskEvent(
            task_id=spec.task_id,
            seq=1,
            time=now,
            state=pb.StateChange(state=pb.TASK_STATE_PENDING),
        )
        self._outbox.insert_task(spec, now, first)
        events = TaskEvents(self._outbox, spec.task_id, 1, pb.TASK_STATE_PENDING)
        task = LiveTask(spec=spec, events=events)
        self._live[spec.task_id] = task
        self._launch(task, self._execute(task))
        log.info("task %s accepted", spec.task_id)

    def _revive(self, row: TaskRow, state: State | None, message: str) -> LiveTask:
        """A live task again for an earlier agent's row, with a state event saying why."""
        events = TaskEvents(self._outbox, row.task_id, row.last_seq, row.state)
        task = LiveTask(spec=row.spec, events=events)
        self._live[row.task_id] = task
        if state is not None:
            events.set_state(state, message)
        log.warning("task %s was %s when the agent stopped: %s", *_ids(row), message)
        return task

    def _readopt(self, row: TaskRow) -> int:
        """Follow a task whose shim an earlier agent started; 1 when it is still running."""
        record = self._outbox.process_of(row.task_id)
        running = alive_as(record.pid, record.started)
        if running:
            task = self._revive(row, pb.TASK_STATE_RUNNING, READOPTED_MESSAGE)
        elif self._execution.files(row.task_id).read_status() is not None:
            task = self._revive(row, pb.TASK_STATE_RUNNING, ENDED_MESSAGE)
        else:  # its result says so: RESTART_MESSAGE
            task = self._revive(row, None, "its process is gone")
        self._launch(task, self._reattach(task, record, holds_slot=running))
        return int(running)

    def _fail_lost(self, row: TaskRow) -> None:
        record = self._outbox.process_of(row.task_id)
        work_dir = self._execution.work_dir(row.task_id)
        kill_stale_task(row.task_id, work_dir, record.pid, record.started)
        events = TaskEvents(self._outbox, row.task_id, row.last_seq, row.state)
        events.finish(pb.TaskResult(state=pb.TASK_STATE_FAILED, message=RESTART_MESSAGE))
        log.warning("task %s was %s when the agent stopped: marked FAILED", *_ids(row))

    def _reserve_slots(self, adopted: int) -> None:
        """Count re-adopted tasks against the slots before anything queued can take one."""
        self._overdraft = max(0, adopted - self.settings.slots)
        self._slots = asyncio.Semaphore(max(0, self.settings.slots - adopted))

    def _release_adopted_slot(self) -> None:
        if self._overdraft:
            self._overdraft -= 1
        else:
            self._slots.release()

    def _launch(self, task: LiveTask, work: Awaitable[pb.TaskResult]) -> None:
        name = f"mle-task {task.spec.task_id}"
        task.runner = asyncio.create_task(self._run(task, work), name=name)

    def _runners(self) -> set[asyncio.Task[None]]:
        return {task.runner for task in self._live.values() if task.runner is not None}

    def _request_stop(self, task: LiveTask, state: State, message: str) -> None:
        if task.stop is not None:
            return
        task.stop = (state, message)
        if task.cancellable and task.runner is not None:
            task.runner.cancel()

    async def _run(self, task: LiveTask, work: Awaitable[pb.TaskResult]) -> None:
        try:
            task.cancellable = task.stop is None
            result = await work  # it always runs: a re-adopted process must be killed when stopped
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            state, message = task.stop or (pb.TASK_STATE_FAILED, DRAIN_MESSAGE)
            result = self._execution.result(task, state, message)
        except Exception:
            log.exception("task %s: internal error", task.spec.task_id)
            message = "internal error: see agent log"
            result = self._execution.result(task, pb.TASK_STATE_FAILED, message)
        task.events.finish(result)
        self._live.pop(task.spec.task_id, None)
        # Housekeeping after the watchers woken by finish() have sent the result on its way.
        asyncio.get_running_loop().call_soon(self._finished, task.spec.task_id, result)

    def _finished(self, task_id: str, result: pb.TaskResult) -> None:
        self._execution.files(task_id).remove()  # its lines are in the outbox now
        message = f": {result.message}" if result.message else ""
        log.info("task %s %s%s", task_id, state_name(result.state), message)

    async def _execute(self, task: LiveTask) -> pb.TaskResult:
        if task.stop is not None:  # stopped before this coroutine got its first turn
            return self._execution.result(task, *task.stop)
        async with self._slots:
            return await self._execution.execute(task)

    async def _reattach(
        self, task: LiveTask, record: ProcessRecord, *, holds_slot: bool
    ) -> pb.TaskResult:
        try:
            return await self._execution.reattach(task, record)
        finally:
            if holds_slot:
                self._release_adopted_slot()


def _ids(row: TaskRow) -> tuple[str, str]:
    return row.task_id, state_name(row.state)


def _sweep(task_root: Path, keep: set[str]) -> None:
    """Remove the control files of tasks that have their result (an agent died before it could)."""
    if not task_root.is_dir():
        return
    for entry in task_root.iterdir():
        task_id, suffix = os.path.splitext(entry.name)
        if suffix in TaskFiles.SUFFIXES and task_id not in keep:
            try:
                entry.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("cannot remove %s: %s", entry, exc)


def _lock_data_dir(data_dir: Path) -> IO[bytes]:
    """Hold an exclusive lock on the data dir so two agents never share one outbox."""
    lock = (data_dir / "agent.lock").open("a+b")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise FailedPrecondition(
            f"data dir {data_dir} is in use by another agent", hint="stop it or give --data-dir"
        ) from None
    return lock
