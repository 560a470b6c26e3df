"""One task from its slot to its result: stage, spawn, follow, supervise, conclude; or re-adopt.

A task started by this agent and one re-adopted from an earlier agent go through the same
supervision: wait for the shim (or the deadline), kill whatever is left of the tree, read the rest
of both logs, then judge the exit status and collect the declared outputs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from mle_agent.events import TaskEvents
from mle_agent.logs import LogFollower
from mle_agent.outbox import Outbox, ProcessRecord, State
from mle_agent.runner import TaskFiles, TaskProcess, task_command, task_environment, task_marks
from mle_agent.settings import AgentSettings
from mle_agent.staging import (
    OutputError,
    StagingError,
    collect_outputs,
    prepare_work_dir,
    remove_work_dir,
)
from mle_proto.store import ArtifactStore
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["RESTART_MESSAGE", "VANISHED_MESSAGE", "Execution", "LiveTask"]

RESTART_MESSAGE = "agent restarted while the task was running; its process is gone"
VANISHED_MESSAGE = "the task's process was killed while the agent was not its parent"


@dataclass(eq=False)
class LiveTask:
    """A task that has no result yet."""

    spec: pb.TaskSpec
    events: TaskEvents
    runner: asyncio.Task[None] | None = None
    process: TaskProcess | None = None
    stop: tuple[State, str] | None = None  # why it is being stopped, first request wins
    cancellable: bool = False  # True only while waiting: for a slot, on staging, on the process
    started: float = 0.0  # time.monotonic() of RUNNING
    deadline: float = 0.0  # time.monotonic() at which it times out; 0 = never


class Execution:
    """Runs tasks' processes for the task manager."""

    def __init__(self, settings: AgentSettings, store: ArtifactStore, outbox: Outbox) -> None:
        self.settings = settings
        self._store = store
        self._outbox = outbox

    def files(self, task_id: str) -> TaskFiles:
        """A task's control files."""
        return TaskFiles(self.settings.task_root, task_id)

    def work_dir(self, task_id: str) -> Path:
        """A task's work dir."""
        return self.settings.work_root / task_id

    async def execute(self, task: LiveTask) -> pb.TaskResult:
        """Stage, spawn and supervise a task that holds a slot."""
        work_dir = self.work_dir(task.spec.task_id)
        task.events.set_state(pb.TASK_STATE_STAGING)
        try:
            if task.spec.inputs or work_dir.exists():  # copies or deletes files: off the loop
                await asyncio.to_thread(prepare_work_dir, work_dir, task.spec.inputs, self._store)
            else:  # one mkdir: cheaper here than a hop to a worker thread and back
                prepare_work_dir(work_dir, (), self._store)
        except StagingError as exc:
            return self.result(task, pb.TASK_STATE_FAILED, str(exc))
        task.events.set_state(pb.TASK_STATE_RUNNING)
        task.started = time.monotonic()
        argv = task_command(task.spec)
        task.cancellable = False  # a cancelled spawn could leave an untracked process
        try:
            process = await self._spawn(task, argv, work_dir)
        except OSError as exc:
            message = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            return self.result(task, pb.TASK_STATE_FAILED, message)
        return await self._see_through(task, process, (0, 0))

    async def reattach(self, task: LiveTask, record: ProcessRecord) -> pb.TaskResult:
        """Supervise a task an earlier agent started, from where its events stopped."""
        task_id = task.spec.task_id
        files = self.files(task_id)
        marks = task_marks(task_id, self.work_dir(task_id))
        process = TaskProcess.adopt(record.pid, record.started, files, marks)
        task.process = process
        running_for = time.time() - record.started if record.started > 0 else 0.0
        task.started = time.monotonic() - max(0.0, running_for)
        task.deadline = record.deadline
        lost = process.done and process.returncode is None
        result = await self._see_through(task, process, record.offsets)
        if lost and task.stop is None:  # gone with no status: how it ended is unknown
            return self.result(task, pb.TASK_STATE_FAILED, RESTART_MESSAGE)
        return result

    def result(self, task: LiveTask, state: State, message: str) -> pb.TaskResult:
        """The task's result: state, message, exit code and duration so far."""
        code = task.process.returncode if task.process is not None else None
        duration = time.monotonic() - task.started if task.started else 0.0
        return pb.TaskResult(
            state=state, exit_code=code or 0, message=message, duration_seconds=duration
        )

    async def _spawn(self, task: LiveTask, argv: list[str], work_dir: Path) -> TaskProcess:
        spec = task.spec
        process = await TaskProcess.spawn(
            argv,
            cwd=work_dir,
            env=task_environment(os.environ, spec, work_dir),
            files=self.files(spec.task_id),
        )
        task.process = process
        if spec.timeout_seconds:
            task.deadline = time.monotonic() + spec.timeout_seconds
        self._outbox.set_process(spec.task_id, process.pid, process.started, task.deadline)
        return process

    async def _see_through(
        self, task: LiveTask, process: TaskProcess, offsets: tuple[int, int]
    ) -> pb.TaskResult:
        files = self.files(task.spec.task_id)
        follower = LogFollower(
            [
                (files.stdout, pb.LOG_STREAM_STDOUT, offsets[0]),
                (files.stderr, pb.LOG_STREAM_STDERR, offsets[1]),
            ],
            task.events.log,
            self.settings.max_log_line,
        )
        follower.start()
        timed_out = await self._supervise(task, process, follower)
        if task.stop is not None:  # asked to stop while it could not be interrupted
            return self.result(task, *task.stop)
        return await self._conclude(task, process, timed_out)

    async def _supervise(self, task: LiveTask, process: TaskProcess, follower: LogFollower) -> bool:
        """Wait for the process (or its deadline); leave nothing of it behind, read all it wrote."""
        try:
            if task.stop is None:
                task.cancellable = True
                timeout = max(0.0, task.deadline - time.monotonic()) if task.deadline else None
                await process.wait(timeout)
        except TimeoutError:
            return True
        finally:
            task.cancellable = False
            await process.close(self.settings.kill_grace, self.settings.output_grace)
            await follower.close()
        return False

    async def _conclude(
        self, task: LiveTask, process: TaskProcess, timed_out: bool
    ) -> pb.TaskResult:
        if timed_out:
            message = f"timed out after {task.spec.timeout_seconds:g}s"
            return self.result(task, pb.TASK_STATE_TIMED_OUT, message)
        code = process.returncode
        if code is None:
            return self.result(task, pb.TASK_STATE_FAILED, VANISHED_MESSAGE)
        if code != 0:
            return self.result(task, pb.TASK_STATE_FAILED, _exit_message(code))
        work_dir = self.work_dir(task.spec.task_id)
        outputs: list[pb.OutputFile] = []
        try:
            if task.spec.outputs:
                outputs = await asyncio.to_thread(
                    collect_outputs, work_dir, task.spec.outputs, self._store
                )
        except OutputError as exc:
            return self.result(task, pb.TASK_STATE_FAILED, str(exc))
        try:
            work_dir.rmdir()  # most often left empty by a step without outputs: no thread hop
        except OSError:
            await asyncio.to_thread(remove_work_dir, work_dir)
        result = self.result(task, pb.TASK_STATE_SUCCEEDED, "")
        result.outputs.extend(outputs)
        return result


def _exit_message(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"
