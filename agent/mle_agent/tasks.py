"""The task manager: accepts tasks, runs them in slots, records their events, feeds watchers.

A task runs in its own asyncio task, independent of any RPC: a client that disconnects changes
nothing. Cancellation, timeouts and shutdown all end in exactly one final TaskResult event.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mle_agent.events import TaskEvents
from mle_agent.outbox import Outbox, State, state_name
from mle_agent.runner import TaskProcess, kill_stale_task, task_command, task_environment
from mle_agent.settings import AgentSettings
from mle_agent.specs import validate_spec
from mle_agent.staging import (
    OutputError,
    StagingError,
    collect_outputs,
    prepare_work_dir,
    remove_work_dir,
)
from mle_proto.errors import AlreadyExists, FailedPrecondition, NotFound
from mle_proto.store import ArtifactStore
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["DRAIN_MESSAGE", "RESTART_MESSAGE", "TaskManager"]

log = logging.getLogger(__name__)

RESTART_MESSAGE = "agent restarted while the task was running; its process is gone"
DRAIN_MESSAGE = "agent shut down before the task finished"
_ACTIVE = (pb.TASK_STATE_STAGING, pb.TASK_STATE_RUNNING)


@dataclass(eq=False)
class _LiveTask:
    """A task that has no result yet."""

    spec: pb.TaskSpec
    events: TaskEvents
    runner: asyncio.Task[None] | None = None
    process: TaskProcess | None = None
    stop: tuple[State, str] | None = None  # why it is being stopped, first request wins
    cancellable: bool = False  # True only while waiting: for a slot, on staging, on the process
    started: float = 0.0  # monotonic time of RUNNING


class TaskManager:
    """Accepts, runs and reports tasks; the servicers' only way to touch them."""

    def __init__(
        self, settings: AgentSettings, outbox: Outbox, store: ArtifactStore, lock: IO[bytes]
    ) -> None:
        self.settings = settings
        self.store = store
        self.boot_id = str(uuid.uuid4())
        self._outbox = outbox
        self._lock = lock
        self._slots = asyncio.Semaphore(settings.slots)
        self._live: dict[str, _LiveTask] = {}
        self._draining = False
        self._drain_listeners: list[Callable[[], Awaitable[None]]] = []

    @classmethod
    def open(cls, settings: AgentSettings) -> TaskManager:
        """Lock the data dir, open outbox and store, and settle tasks an earlier agent left."""
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
        return self._draining

    @property
    def running_count(self) -> int:
        """Tasks staging or running right now."""
        return sum(1 for task in self._live.values() if task.events.state in _ACTIVE)

    def recover(self) -> int:
        """Give every task without a result (left by an earlier agent) a FAILED result."""
        rows = self._outbox.unfinished()
        for row in rows:
            work_dir = self.settings.work_root / row.task_id
            kill_stale_task(row.task_id, work_dir, *self._outbox.process_of(row.task_id))
            now = time.time()
            result = pb.TaskResult(state=pb.TASK_STATE_FAILED, message=RESTART_MESSAGE)
            event = pb.TaskEvent(task_id=row.task_id, seq=row.last_seq + 1, time=now, result=result)
            self._outbox.append(
                row.task_id, [event], state=pb.TASK_STATE_FAILED, exit_code=0, finished=now
            )
            log.warning(
                "task %s was %s when the agent stopped: marked FAILED",
                row.task_id,
                state_name(row.state),
            )
        return len(rows)

    async def start(self, spec: pb.TaskSpec) -> pb.TaskHandle:
        """Accept a task (idempotent on task_id) and schedule it."""
        validate_spec(spec)
        row = self._outbox.get(spec.task_id)
        if row is not None:
            if row.spec != spec:
                raise AlreadyExists(f"task {spec.task_id} already exists with a different spec")
            return pb.TaskHandle(task_id=spec.task_id, state=row.state, created=False)
        if self._draining:
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

    def ack(self, task_id: str, upto_seq: int) -> int:
        """Record the operator's ack; return the task's acked_seq."""
        acked = self._outbox.ack(task_id, upto_seq)
        if acked is None:
            raise NotFound(f"task {task_id} is not on this agent")
        return acked

    def on_drain(self, listener: Callable[[], Awaitable[None]]) -> None:
        """Call listener once when draining starts (e.g. to report NOT_SERVING)."""
        self._drain_listeners.append(listener)

    async def drain(self, timeout: float) -> None:
        """Stop accepting tasks, let live ones finish up to timeout, then stop the rest."""
        if not self._draining:
            self._draining = True
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
        task = _LiveTask(spec=spec, events=events)
        self._live[spec.task_id] = task
        task.runner = asyncio.create_task(self._run(task), name=f"mle-task {spec.task_id}")
        log.info("task %s accepted", spec.task_id)

    def _runners(self) -> set[asyncio.Task[None]]:
        return {task.runner for task in self._live.values() if task.runner is not None}

    def _request_stop(self, task: _LiveTask, state: State, message: str) -> None:
        if task.stop is not None:
            return
        task.stop = (state, message)
        if task.cancellable and task.runner is not None:
            task.runner.cancel()

    async def _run(self, task: _LiveTask) -> None:
        try:
            if task.stop is None:
                task.cancellable = True
                result = await self._execute(task)
            else:  # stopped before this coroutine got its first turn
                result = self._result(task, *task.stop)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            state, message = task.stop or (pb.TASK_STATE_FAILED, DRAIN_MESSAGE)
            result = self._result(task, state, message)
        except Exception:
            log.exception("task %s: internal error", task.spec.task_id)
            result = self._result(task, pb.TASK_STATE_FAILED, "internal error: see agent log")
        task.events.finish(result)
        self._live.pop(task.spec.task_id, None)
        log.info(
            "task %s %s%s",
            task.spec.task_id,
            state_name(result.state),
            f": {result.message}" if result.message else "",
        )

    async def _execute(self, task: _LiveTask) -> pb.TaskResult:
        async with self._slots:
            work_dir = self.settings.work_root / task.spec.task_id
            task.events.set_state(pb.TASK_STATE_STAGING)
            try:
                await asyncio.to_thread(prepare_work_dir, work_dir, task.spec.inputs, self.store)
            except StagingError as exc:
                return self._result(task, pb.TASK_STATE_FAILED, str(exc))
            task.events.set_state(pb.TASK_STATE_RUNNING)
            task.started = time.monotonic()
            argv = task_command(task.spec)
            task.cancellable = False  # a cancelled spawn could leave an untracked process
            try:
                process = await self._spawn(task, argv, work_dir)
            except OSError as exc:
                message = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
                return self._result(task, pb.TASK_STATE_FAILED, message)
            timed_out = await self._supervise(task, process)
            if task.stop is not None:  # asked to stop while it could not be interrupted
                return self._result(task, *task.stop)
            return await self._conclude(task, process, work_dir, timed_out)

    async def _spawn(self, task: _LiveTask, argv: list[str], work_dir: Path) -> TaskProcess:
        process = await TaskProcess.spawn(
            argv,
            cwd=work_dir,
            env=task_environment(os.environ, task.spec, work_dir),
            sink=task.events.log,
            max_line=self.settings.max_log_line,
        )
        task.process = process
        self._outbox.set_process(task.spec.task_id, process.pid, process.started)
        return process

    async def _supervise(self, task: _LiveTask, process: TaskProcess) -> bool:
        """Wait for the process (or its timeout); always leave nothing of it behind."""
        timeout = task.spec.timeout_seconds or None
        try:
            if task.stop is None:
                task.cancellable = True
                await process.wait(timeout)
        except TimeoutError:
            return True
        finally:
            task.cancellable = False
            await process.close(self.settings.kill_grace, self.settings.output_grace)
        return False

    async def _conclude(
        self, task: _LiveTask, process: TaskProcess, work_dir: Path, timed_out: bool
    ) -> pb.TaskResult:
        if timed_out:
            message = f"timed out after {task.spec.timeout_seconds:g}s"
            return self._result(task, pb.TASK_STATE_TIMED_OUT, message)
        code = process.returncode or 0
        if code != 0:
            return self._result(task, pb.TASK_STATE_FAILED, _exit_message(code))
        try:
            outputs = await asyncio.to_thread(
                collect_outputs, work_dir, task.spec.outputs, self.store
            )
        except OutputError as exc:
            return self._result(task, pb.TASK_STATE_FAILED, str(exc))
        await asyncio.to_thread(remove_work_dir, work_dir)
        result = self._result(task, pb.TASK_STATE_SUCCEEDED, "")
        result.outputs.extend(outputs)
        return result

    def _result(self, task: _LiveTask, state: State, message: str) -> pb.TaskResult:
        code = task.process.returncode if task.process is not None else None
        duration = time.monotonic() - task.started if task.started else 0.0
        return pb.TaskResult(
            state=state, exit_code=code or 0, message=message, duration_seconds=duration
        )


def _exit_message(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


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
