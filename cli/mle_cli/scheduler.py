"""Runs a Plan: dispatches ready steps to executors in parallel, retries, records into the ledger.

The scheduler knows nothing about gRPC or about which agent is local: it asks `executor_for` for an
Executor per target and talks to that. Ledger writes go through the batched writer; the few that
must be durable before acting (an attempt before its task starts) are flushed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mle_cli.errors import RecipeError
from mle_cli.executor import Executor, OutputFile, TaskRequest, TaskUpdate
from mle_cli.ledger import ArtifactRecord, EventRecord, Ledger, LedgerWriter
from mle_cli.recipe import render_step
from mle_cli.recipe.plan import Plan, Step
from mle_cli.states import FINAL, Status
from mle_proto.errors import AgentUnavailable, MleError
from mle_proto.store import ArtifactStore

__all__ = ["Progress", "RunOutcome", "Scheduler", "StepOutcome"]

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[str], Awaitable[Executor]]


class Progress(Protocol):
    """Receives what a user watching the run should see."""

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        """A step moved to a new status."""
        ...

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        """A step printed a line."""
        ...


@dataclass
class StepOutcome:
    """What happened to one step."""

    step_id: str
    status: Status = Status.PENDING
    target: str = ""
    attempts: int = 0
    exit_code: int | None = None
    message: str = ""
    started: float | None = None
    finished: float | None = None
    outputs: dict[str, OutputFile] = field(default_factory=dict)
    last_lines: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunOutcome:
    """The final state of a run."""

    run_id: str
    status: Status
    steps: Mapping[str, StepOutcome]
    duration: float

    @property
    def failed_steps(self) -> list[StepOutcome]:
        """Steps that failed, timed out or were lost, in plan order."""
        bad = {Status.FAILED, Status.TIMED_OUT, Status.LOST}
        return [s for s in self.steps.values() if s.status in bad]


_LAST_LINES = 10


class Scheduler:
    """Executes one run of a plan."""

    def __init__(
        self,
        plan: Plan,
        run_id: str,
        *,
        executor_for: ExecutorFactory,
        writer: LedgerWriter,
        store: ArtifactStore,
        progress: Progress,
        watch_grace: float = 30.0,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self._executor_for = executor_for
        self._writer = writer
        self._store = store
        self._progress = progress
        self._watch_grace = watch_grace
        self._steps = {s.id: StepOutcome(s.id, target=s.target) for s in plan.steps}
        self._cancel_reason = ""
        self._cancelled = asyncio.Event()
        self._running: dict[str, tuple[Executor, str]] = {}  # step -> (executor, task id)
        self._background: set[asyncio.Task[None]] = set()

    @property
    def outcomes(self) -> Mapping[str, StepOutcome]:
        """The steps' outcomes so far."""
        return dict(self._steps)

    def cancel(self, reason: str) -> None:
        """Cancel the run: running tasks are killed, pending steps never start."""
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()

    async def run(self) -> RunOutcome:
        """Drive the run to a final state."""
        started = time.time()
        self._write(lambda led: led.update_run(self.run_id, status=Status.RUNNING, started=started))
        await self._writer.flush()
        tasks: dict[str, asyncio.Task[None]] = {}
        canceller = asyncio.create_task(self._cancel_running())
        try:
            await self._drive(tasks)
        except Exception as e:
            await self._abandon(e)  # a bug must not leave the run "running" and tasks orphaned
            raise
        finally:
            canceller.cancel()
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), *self._background, return_exceptions=True)
        return await self._finish(started)

    async def _drive(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        while True:
            self._settle_blocked()
            for step in self._ready(tasks):
                tasks[step.id] = asyncio.create_task(self._run_step(step), name=step.id)
            live = [t for t in tasks.values() if not t.done()]
            if not live:
                break
            await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks.values():
                if task.done() and not task.cancelled() and task.exception() is not None:
                    task.result()  # surface a bug at once instead of hiding it

    async def _abandon(self, error: Exception) -> None:
        message = f"internal error: {type(error).__name__}: {error}"
        for executor, task_id in list(self._running.values()):
            await self._cancel_quietly(executor, task_id, message)
        run_id, finished = self.run_id, time.time()
        self._write(lambda led: led.finish_abandoned_run(run_id, Status.FAILED, message, finished))
        with contextlib.suppress(MleError):
            await self._writer.flush()

    # -- the DAG ----------------------------------------------------------------------------------

    def _ready(self, tasks: Mapping[str, asyncio.Task[None]]) -> list[Step]:
        if self._cancelled.is_set():
            return []
        return [
            step
            for step in self.plan.steps
            if step.id not in tasks
            and all(self._steps[n].status == Status.SUCCEEDED for n in step.needs)
        ]

    def _settle_blocked(self) -> None:
        """Mark steps that can never run: skipped after a failed need, cancelled after a cancel."""
        for step in self.plan.steps:
            outcome = self._steps[step.id]
            if outcome.status != Status.PENDING:
                continue
            if self._cancelled.is_set():
                self._set_status(outcome, Status.CANCELLED, self._cancel_reason)
                continue
            blocked = [n for n in step.needs if self._steps[n].status in FINAL - {Status.SUCCEEDED}]
            if blocked:
                need = self._steps[blocked[0]]
                # Downstream of a cancelled step is cancelled too; of a failure, skipped.
                status = Status.CANCELLED if need.status == Status.CANCELLED else Status.SKIPPED
                self._set_status(outcome, status, f"needs {need.step_id}, which {need.status}")

    # -- one step ---------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        outcome = self._steps[step.id]
        try:
            executor = await self._executor_for(step.target)
        except MleError as e:
            self._set_status(outcome, Status.FAILED, str(e))
            return
        inputs = self._inputs(step)
        for attempt in range(1, step.retries.max + 2):
            try:
                result = await self._attempt(step, executor, attempt, inputs)
            except MleError as e:  # could not even start: render error, agent unreachable...
                result = TaskUpdate(0, time.time(), "result", state=Status.FAILED, text=str(e))
                if isinstance(e, RecipeError):
                    self._finish_step(outcome, result)
                    return
            if result.status == Status.CANCELLED and not self._cancelled.is_set():
                self.cancel(result.text or "cancelled on the agent")  # e.g. by `mle cancel`
            if result.status == Status.SUCCEEDED or self._cancelled.is_set():
                break
            if result.status == Status.CANCELLED or attempt > step.retries.max:
                break
            delay = step.retries.delay(attempt)
            self._set_status(
                outcome, Status.RETRYING, f"attempt {attempt} {result.state}; retry in {delay:g}s"
            )
            if await self._sleep_unless_cancelled(delay):
                result = TaskUpdate(0, time.time(), "result", Status.CANCELLED, text="cancelled")
                break
        if result.status == Status.SUCCEEDED:
            await self._collect_outputs(step, executor, result)
        self._finish_step(outcome, result)

    def _inputs(self, step: Step) -> dict[str, str]:
        inputs = {f.path: f.digest for f in self.plan.files}
        for need in step.needs:
            inputs.update({p: o.digest for p, o in self._steps[need].outputs.items()})
        return inputs

    async def _attempt(
        self, step: Step, executor: Executor, attempt: int, inputs: Mapping[str, str]
    ) -> TaskUpdate:
        outcome = self._steps[step.id]
        task_id = f"{self.run_id}.{step.id}.{attempt}"
        request = self._request(step, executor, attempt, task_id, inputs)
        async with executor.slot():
            if self._cancelled.is_set():
                return TaskUpdate(0, time.time(), "result", Status.CANCELLED, text="cancelled")
            await executor.ship(inputs.values(), self._store)
            outcome.attempts, outcome.target = attempt, executor.name
            outcome.started = outcome.started or time.time()
            self._write(
                lambda led: led.start_attempt(
                    task_id, self.run_id, step.id, attempt, executor.name, executor.address
                )
            )
            await self._writer.flush()  # the attempt is on record before the task exists
            self._set_status(outcome, Status.RUNNING, f"on {executor.name}, attempt {attempt}")
            self._running[step.id] = (executor, task_id)
            try:
                await executor.start(request)
                if self._cancelled.is_set():  # cancelled while the task was starting
                    await executor.cancel(task_id, self._cancel_reason)
                result = await self._follow(step, executor, task_id)
            except MleError as e:  # the attempt cannot be followed: close it, stop its task
                result = TaskUpdate(0, time.time(), "result", Status.FAILED, text=str(e))
                await self._cancel_quietly(executor, task_id, f"attempt abandoned: {e}")
            finally:
                self._running.pop(step.id, None)
        self._write(
            lambda led: led.update_attempt(
                task_id,
                status=result.state,
                exit_code=result.exit_code,
                message=result.text,
                finished=result.time,
            )
        )
        return result

    def _request(
        self,
        step: Step,
        executor: Executor,
        attempt: int,
        task_id: str,
        inputs: Mapping[str, str],
    ) -> TaskRequest:
        rendered = render_step(self.plan, step, run_id=self.run_id, target=executor.name)
        env = {
            **rendered.env,
            "MLE_RUN_ID": self.run_id,
            "MLE_STEP": step.id,
            "MLE_ATTEMPT": str(attempt),
            "MLE_TARGET": executor.name,
        }
        return TaskRequest(
            task_id=task_id,
            run_id=self.run_id,
            step=step.id,
            attempt=attempt,
            shell=rendered.shell,
            argv=rendered.argv,
            env=env,
            inputs=dict(inputs),
            outputs=step.outputs,
            timeout=step.timeout,
        )

    async def _follow(self, step: Step, executor: Executor, task_id: str) -> TaskUpdate:
        """Record the task's events until its result; re-attach if the stream breaks."""
        last_seq = 0
        silent_since: float | None = None
        while True:
            try:
                async for update in executor.watch(task_id, last_seq):
                    silent_since = None
                    last_seq = max(last_seq, update.seq)
                    self._record(step, task_id, update)
                    if update.kind == "result":
                        self._ack_later(executor, task_id, update.seq)
                        return update
                raise AgentUnavailable(f"agent {executor.name}: the event stream ended early")
            except AgentUnavailable as e:
                now = time.monotonic()
                silent_since = silent_since or now
                if now - silent_since > self._watch_grace:
                    message = f"agent {executor.name} silent for {self._watch_grace:g}s: {e}"
                    return TaskUpdate(last_seq, time.time(), "result", Status.LOST, text=message)
                await asyncio.sleep(0.5)

    def _record(self, step: Step, task_id: str, update: TaskUpdate) -> None:
        event = EventRecord(
            task_id=task_id,
            seq=update.seq,
            run_id=self.run_id,
            step_id=step.id,
            time=update.time,
            kind=update.kind,
            stream=update.stream or None,
            state=update.state or None,
            text=update.text,
        )
        self._write(lambda led: led.record_events([event]))
        if update.kind == "log":
            lines = self._steps[step.id].last_lines
            lines.append(update.text)
            del lines[:-_LAST_LINES]
            self._progress.step_log(step.id, update.stream, update.text)

    def _ack_later(self, executor: Executor, task_id: str, seq: int) -> None:
        async def ack() -> None:
            await self._writer.flush()  # only acknowledge what the ledger durably holds
            try:
                await executor.ack(task_id, seq)
            except MleError as e:
                log.debug("ack of %s failed: %s", task_id, e)

        task = asyncio.create_task(ack())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _collect_outputs(self, step: Step, executor: Executor, result: TaskUpdate) -> None:
        outcome = self._steps[step.id]
        await executor.fetch((o.digest for o in result.outputs), self._store)
        outcome.outputs = {o.path: o for o in result.outputs}
        records = [
            ArtifactRecord(self.run_id, step.id, o.path, o.digest, o.size) for o in result.outputs
        ]
        self._write(lambda led: led.record_artifacts(records))

    def _finish_step(self, outcome: StepOutcome, result: TaskUpdate) -> None:
        outcome.exit_code = result.exit_code
        outcome.finished = time.time()
        status = result.status if result.state else Status.FAILED
        self._set_status(outcome, status, result.text)

    # -- cancellation and bookkeeping -------------------------------------------------------------

    async def _cancel_running(self) -> None:
        await self._cancelled.wait()
        for executor, task_id in list(self._running.values()):
            await self._cancel_quietly(executor, task_id, self._cancel_reason)

    async def _cancel_quietly(self, executor: Executor, task_id: str, reason: str) -> None:
        try:
            await executor.cancel(task_id, reason)
        except MleError as e:  # best effort: the agent may be gone, or never got the task
            log.debug("could not cancel %s on %s: %s", task_id, executor.name, e)

    async def _sleep_unless_cancelled(self, delay: float) -> bool:
        try:
            await asyncio.wait_for(self._cancelled.wait(), timeout=delay)
        except TimeoutError:
            return False
        return True

    def _set_status(self, outcome: StepOutcome, status: Status, detail: str) -> None:
        outcome.status, outcome.message = status, detail
        fields: dict[str, object] = {"status": status, "message": detail}
        if status in FINAL:
            outcome.finished = outcome.finished or time.time()
            fields.update(finished=outcome.finished, exit_code=outcome.exit_code)
        run_id, step_id = self.run_id, outcome.step_id
        self._write(lambda led: led.update_step(run_id, step_id, **fields))
        self._progress.step_changed(step_id, status, detail)

    async def _finish(self, started: float) -> RunOutcome:
        statuses = {s.status for s in self._steps.values()}
        failed = statuses & {Status.FAILED, Status.TIMED_OUT, Status.LOST}
        if self._cancelled.is_set() or (Status.CANCELLED in statuses and not failed):
            # A task cancelled on its agent (`mle cancel` reaches agents directly) cancels the run
            # even before this scheduler has seen the ledger's cancel flag.
            status, message = Status.CANCELLED, self._cancel_reason or "cancelled"
        elif statuses <= {Status.SUCCEEDED}:
            status, message = Status.SUCCEEDED, ""
        else:
            status = Status.FAILED
            bad = [
                s
                for s in self._steps.values()
                if s.status not in (Status.SUCCEEDED, Status.SKIPPED)
            ]
            message = f"step {bad[0].step_id} {bad[0].status}" if bad else "steps were skipped"
        finished = time.time()
        self._write(
            lambda led: led.update_run(
                self.run_id, status=status, finished=finished, message=message
            )
        )
        await self._writer.flush()
        return RunOutcome(self.run_id, status, dict(self._steps), finished - started)

    def _write(self, write: Callable[[Ledger], None]) -> None:
        self._writer.submit(write)
