"""Runs a Plan: dispatches ready steps in parallel, evaluates conditions, reuses cached results,
runs the built-in gates and deploys, retries, and records every decision in the ledger.

The scheduler knows nothing about gRPC or about which agent is local: it asks `executor_for` for
an Executor per target. The ledger is the source of truth: a step's outcome is committed before
its dependants act on it, and a resumed run starts from what the ledger holds (`prior`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, Protocol

from mle_cli import faults, gates
from mle_cli.attempts import AttemptRunner, result
from mle_cli.deploying import Deployer, DeploySteps
from mle_cli.errors import RecipeError
from mle_cli.executor import Executor, TaskUpdate
from mle_cli.ledger import Ledger, LedgerWriter
from mle_cli.recipe import evaluate_when, render_options
from mle_cli.recipe.plan import Plan, Step
from mle_cli.recovery import PriorStep
from mle_cli.states import FINAL, Status
from mle_cli.tasksteps import (
    SchedulerOptions,
    StepOutcome,
    StepResults,
    TaskSteps,
    task_request,
)
from mle_proto.errors import MleError
from mle_proto.store import ArtifactStore

__all__ = [
    "Progress",
    "RunOutcome",
    "Scheduler",
    "SchedulerOptions",
    "StepOutcome",
    "task_request",
]

ExecutorFactory = Callable[[str], Awaitable[Executor]]
_OK = frozenset({Status.SUCCEEDED, Status.CACHED})
_BAD = frozenset({Status.FAILED, Status.TIMED_OUT, Status.LOST})
_LAST_LINES = 10


class Progress(Protocol):
    """Receives what a user watching the run should see."""

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        """A step moved to a new status."""
        ...

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        """A step printed a line."""
        ...


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
        return [s for s in self.steps.values() if s.status in _BAD]


class Scheduler:
    """Executes one run of a plan, new or resumed."""

    def __init__(
        self,
        plan: Plan,
        run_id: str,
        *,
        executor_for: ExecutorFactory,
        writer: LedgerWriter,
        reader: Ledger,
        store: ArtifactStore,
        progress: Progress,
        options: SchedulerOptions | None = None,
        prior: Mapping[str, PriorStep] | None = None,
        deployer: Deployer | None = None,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self._executor_for = executor_for
        self._writer = writer
        self._reader = reader
        self._store = store
        self._progress = progress
        self._options = options or SchedulerOptions()
        self._prior = dict(prior or {})
        self._steps = {s.id: self._initial(s) for s in plan.steps}
        self._position = {s.id: i for i, s in enumerate(plan.steps)}
        self._dependents: dict[str, list[Step]] = {s.id: [] for s in plan.steps}
        for step in plan.steps:
            for need in step.needs:
                self._dependents[need].append(step)
        self._cancel_reason = ""
        self._cancelled = asyncio.Event()
        self._attempts = AttemptRunner(
            run_id,
            executor_for=executor_for,
            writer=writer,
            on_log=self._on_log,
            agent_grace=self._options.agent_grace,
        )
        self._tasks = TaskSteps(
            plan,
            run_id,
            host=self,
            outcomes=self._steps,
            attempts=self._attempts,
            executor_for=executor_for,
            writer=writer,
            reader=reader,
            store=store,
            options=self._options,
            prior=self._prior,
        )
        self._deploys = DeploySteps(
            plan,
            run_id,
            host=self,
            outcomes=self._steps,
            writer=writer,
            store=store,
            deployer=deployer,
        )

    def _initial(self, step: Step) -> StepOutcome:
        outcome = StepOutcome(step.id, target=step.target)
        prior = self._prior.get(step.id)
        if prior is not None and prior.done:  # never runs again
            outcome.status, outcome.message = prior.status, prior.message
            outcome.exit_code, outcome.started = prior.exit_code, prior.started
            outcome.finished = prior.finished
            outcome.outputs, outcome.metrics = dict(prior.outputs), dict(prior.metrics)
            outcome.attempts = len(prior.attempts)
        return outcome

    @property
    def outcomes(self) -> Mapping[str, StepOutcome]:
        """The steps' outcomes so far."""
        return dict(self._steps)

    @property
    def cancelled(self) -> asyncio.Event:
        """Set once the run is cancelled."""
        return self._cancelled

    @property
    def cancel_reason(self) -> str:
        """Why the run was cancelled."""
        return self._cancel_reason

    def cancel(self, reason: str) -> None:
        """Cancel the run: running tasks are killed, pending steps never start."""
        if not self._cancelled.is_set():
            self._cancel_reason = reason
            self._cancelled.set()

    async def run(self) -> RunOutcome:
        """Drive the run to a final state."""
        started = time.time()
        self._write(lambda led: _mark_running(led, self.run_id, started))
        for step_id, outcome in self._steps.items():
            if outcome.status in _OK:
                self._progress.step_changed(step_id, outcome.status, "done in an earlier drive")
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
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            await self._attempts.close()
        return await self._finish(started)

    async def _drive(self, tasks: dict[str, asyncio.Task[None]]) -> None:
        live: set[asyncio.Task[None]] = set()
        candidates: Iterable[Step] = self.plan.steps
        while True:
            for step in self._settle(candidates, tasks):
                tasks[step.id] = asyncio.create_task(self._run_step(step), name=step.id)
                live.add(tasks[step.id])
            if not live:
                break
            done, live = await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    task.result()  # surface a bug at once instead of hiding it
            # Only a finished step's dependants can change, unless the run was cancelled.
            finished = (self._dependents[task.get_name()] for task in done)
            candidates = self.plan.steps if self._cancelled.is_set() else chain(*finished)

    async def _abandon(self, error: Exception) -> None:
        message = f"internal error: {type(error).__name__}: {error}"
        await self._attempts.cancel_running(message)
        run_id, finished = self.run_id, time.time()
        self._write(lambda led: led.finish_abandoned_run(run_id, Status.FAILED, message, finished))
        with contextlib.suppress(MleError):
            await self._writer.flush()

    # -- the DAG ----------------------------------------------------------------------------------

    def _settle(self, candidates: Iterable[Step], tasks: Mapping[str, object]) -> list[Step]:
        """Of these pending steps, and the dependants of those it closes: close the ones that can
        never run (skipped after a failed need, cancelled after a cancel), in plan order; return
        the ones ready to start. Only the candidates are looked at: a run of N steps is not
        O(N²)."""
        heap = [self._position[s.id] for s in candidates]
        heapq.heapify(heap)
        ready: dict[str, Step] = {}
        while heap:
            step = self.plan.steps[heapq.heappop(heap)]
            outcome = self._steps[step.id]
            if outcome.status != Status.PENDING or step.id in tasks or step.id in ready:
                continue
            need = None if self._cancelled.is_set() else self._blocker(step)
            if self._cancelled.is_set():
                self.set_status(outcome, Status.CANCELLED, self._cancel_reason)
            elif need is not None:
                # Downstream of a cancelled step is cancelled too; of a failure, skipped.
                status = Status.CANCELLED if need.status == Status.CANCELLED else Status.SKIPPED
                self.set_status(outcome, status, f"needs {need.step_id}, which {need.status}")
            else:
                if self._needs_met(step):
                    ready[step.id] = step
                continue
            for dependant in self._dependents[step.id]:
                heapq.heappush(heap, self._position[dependant.id])
        return list(ready.values())

    def _needs_met(self, step: Step) -> bool:
        needs = [self._steps[n].status for n in step.needs]
        if step.trigger == "all-succeeded":
            return all(s in _OK for s in needs)
        return all(s in FINAL for s in needs)

    def _blocker(self, step: Step) -> StepOutcome | None:
        """A need whose outcome means this step will never run, by its trigger rule."""
        for need in step.needs:
            outcome = self._steps[need]
            if step.trigger == "all-succeeded" and outcome.status in FINAL - _OK:
                return outcome
            if step.trigger == "none-failed" and outcome.status in _BAD | {Status.CANCELLED}:
                return outcome
        return None

    def _context(self) -> dict[str, Any]:
        """What templates and `when:` see of the run so far."""
        return {"params": dict(self.plan.params), "steps": StepResults(self._steps)}

    # -- one step ---------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        outcome = self._steps[step.id]
        try:
            context = self._context()
            if step.when is not None and not evaluate_when(self.plan, step, context):
                self.set_status(outcome, Status.SKIPPED, f"when: {step.when} is false")
            elif step.uses == "mle/approve":
                await self._approve(step, outcome, context)
            elif step.uses == "mle/select":
                self._select(step, outcome, context)
            elif step.uses == "mle/deploy":
                await self._deploys.run(step, outcome, context)
            else:
                await self._tasks.run(step, outcome, context)
        except RecipeError as e:  # a template or condition that cannot be evaluated
            self.finish_step(outcome, result(Status.FAILED, str(e)))
        await self._writer.flush()  # the outcome is durable before dependants act on it
        faults.point("step-finished")

    # -- built-in steps ---------------------------------------------------------------------------

    async def _approve(self, step: Step, outcome: StepOutcome, context: dict[str, Any]) -> None:
        options = render_options(
            self.plan, step, run_id=self.run_id, target="local", steps=context["steps"]
        )
        run_id, step_id = self.run_id, step.id
        for need in step.needs:  # a gate passes on what it guards
            outcome.outputs.update(self._steps[need].outputs)
        self._tasks.record_results(step.id, outcome)
        if gates.truthy(options.get("auto", False)):
            self._write(
                lambda led: led.record_approval(
                    run_id, step_id, decision="approved", who="auto", reason="with.auto is true"
                )
            )
            self.set_status(outcome, Status.SUCCEEDED, "approved automatically (with.auto)")
            return
        message = str(options.get("message") or "")
        wait = f"waiting for approval: mle approve {run_id} {step_id!r}"
        self.set_status(outcome, Status.WAITING, f"{message} ({wait})" if message else wait)
        await self._writer.flush()
        decision = await gates.wait_for_decision(
            self._reader, run_id, step_id, self._options.poll_interval, self._cancelled.is_set
        )
        if decision is None:
            self.set_status(outcome, Status.CANCELLED, self._cancel_reason)
            return
        status = Status.SUCCEEDED if decision.approved else Status.FAILED
        self.set_status(outcome, status, decision.describe())

    def _select(self, step: Step, outcome: StepOutcome, context: dict[str, Any]) -> None:
        options = render_options(
            self.plan, step, run_id=self.run_id, target="local", steps=context["steps"]
        )
        found = {
            n: (self._steps[n].outputs, self._steps[n].metrics)
            for n in step.needs
            if self._steps[n].status in _OK
        }
        chosen = gates.select_child(self.plan, step, options, found)
        outcome.outputs = dict(chosen.outputs)
        outcome.metrics = {**chosen.metrics, "selected": chosen.step_id}
        self._tasks.record_results(step.id, outcome)
        metric = options["metric"]
        self.set_status(
            outcome, Status.SUCCEEDED, f"picked {chosen.step_id} ({metric}={chosen.value:g})"
        )

    # -- cancellation and bookkeeping -------------------------------------------------------------

    async def _cancel_running(self) -> None:
        await self._cancelled.wait()
        await self._attempts.cancel_running(self._cancel_reason)

    async def sleep_unless_cancelled(self, delay: float) -> bool:
        try:
            await asyncio.wait_for(self._cancelled.wait(), timeout=delay)
        except TimeoutError:
            return False
        return True

    def _on_log(self, step_id: str, stream: str, text: str) -> None:
        if step_id not in self._steps:
            return
        lines = self._steps[step_id].last_lines
        lines.append(text)
        del lines[:-_LAST_LINES]
        self._progress.step_log(step_id, stream, text)

    def finish_step(self, outcome: StepOutcome, update: TaskUpdate) -> None:
        outcome.exit_code = update.exit_code
        outcome.finished = time.time()
        status = update.status if update.state else Status.FAILED
        self.set_status(outcome, status, update.text)

    def set_status(self, outcome: StepOutcome, status: Status, detail: str) -> None:
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
        failed = statuses & _BAD
        if self._cancelled.is_set() or (Status.CANCELLED in statuses and not failed):
            # A task cancelled on its agent (`mle cancel` reaches agents directly) cancels the run
            # even before this scheduler has seen the ledger's cancel flag.
            status, message = Status.CANCELLED, self._cancel_reason or "cancelled"
        elif not failed and statuses <= _OK | {Status.SKIPPED}:
            status, message = Status.SUCCEEDED, ""
        else:
            status = Status.FAILED
            bad = [s for s in self._steps.values() if s.status not in _OK | {Status.SKIPPED}]
            message = f"step {bad[0].step_id} {bad[0].status}" if bad else "steps were skipped"
        # A run ends when its last step did: resuming a finished run keeps the time it ended.
        ends = [s.finished for s in self._steps.values() if s.finished]
        finished = max(ends) if ends else time.time()
        self._write(
            lambda led: led.update_run(
                self.run_id, status=status, finished=finished, message=message
            )
        )
        await self._writer.flush()
        return RunOutcome(self.run_id, status, dict(self._steps), time.time() - started)

    def _write(self, write: Callable[[Ledger], None]) -> None:
        self._writer.submit(write)


def _mark_running(ledger: Ledger, run_id: str, started: float) -> None:
    """A run starts, or resumes: it is running again, and an old cancel request is spent."""
    row = ledger.run(run_id)
    ledger.update_run(
        run_id,
        status=Status.RUNNING,
        started=row["started"] or started,
        finished=None,
        cancel_requested=0,
        message=None,
    )
