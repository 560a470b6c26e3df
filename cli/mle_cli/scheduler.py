"""Runs a Plan: dispatches ready steps in parallel, evaluates conditions, reuses cached results,
runs the built-in gates, retries, and records every decision in the ledger.

The scheduler knows nothing about gRPC or about which agent is local: it asks `executor_for` for
an Executor per target. The ledger is the source of truth: a step's outcome is committed before
its dependants act on it, and a resumed run starts from what the ledger holds (`prior`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mle_cli import caching, faults, gates
from mle_cli.attempts import AttemptRunner, result
from mle_cli.errors import RecipeError
from mle_cli.executor import Executor, OutputFile, TaskRequest, TaskUpdate
from mle_cli.ledger import ArtifactRecord, Ledger, LedgerWriter
from mle_cli.recipe import evaluate_when, render_options, render_step
from mle_cli.recipe.plan import Plan, Step
from mle_cli.recovery import PriorAttempt, PriorStep
from mle_cli.states import FINAL, Status
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
_MAX_METRICS_BYTES = 1024 * 1024


class Progress(Protocol):
    """Receives what a user watching the run should see."""

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        """A step moved to a new status."""
        ...

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        """A step printed a line."""
        ...


@dataclass(frozen=True)
class SchedulerOptions:
    """Knobs of one run."""

    agent_grace: float = 10.0
    poll_interval: float = 0.5  # how often the ledger is read for approvals
    use_cache: bool = True


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
    metrics: dict[str, Any] = field(default_factory=dict)
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
        self._cancel_reason = ""
        self._cancelled = asyncio.Event()
        self._attempts = AttemptRunner(
            run_id,
            executor_for=executor_for,
            writer=writer,
            on_log=self._on_log,
            agent_grace=self._options.agent_grace,
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
        await self._attempts.cancel_running(message)
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
            and self._steps[step.id].status == Status.PENDING
            and self._needs_met(step)
        ]

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

    def _settle_blocked(self) -> None:
        """Mark steps that can never run: skipped after a failed need, cancelled after a cancel."""
        for step in self.plan.steps:
            outcome = self._steps[step.id]
            if outcome.status != Status.PENDING:
                continue
            if self._cancelled.is_set():
                self._set_status(outcome, Status.CANCELLED, self._cancel_reason)
                continue
            need = self._blocker(step)
            if need is not None:
                # Downstream of a cancelled step is cancelled too; of a failure, skipped.
                status = Status.CANCELLED if need.status == Status.CANCELLED else Status.SKIPPED
                self._set_status(outcome, status, f"needs {need.step_id}, which {need.status}")

    def _context(self) -> dict[str, Any]:
        """What templates and `when:` see of the run so far."""
        return {
            "params": dict(self.plan.params),
            "steps": {
                o.step_id: {
                    "status": o.status.value,
                    "metrics": dict(o.metrics),
                    "outputs": list(o.outputs),
                }
                for o in self._steps.values()
            },
        }

    # -- one step ---------------------------------------------------------------------------------

    async def _run_step(self, step: Step) -> None:
        outcome = self._steps[step.id]
        try:
            context = self._context()
            if step.when is not None and not evaluate_when(self.plan, step, context):
                self._set_status(outcome, Status.SKIPPED, f"when: {step.when} is false")
            elif step.uses == "mle/approve":
                await self._approve(step, outcome, context)
            elif step.uses == "mle/select":
                self._select(step, outcome, context)
            else:
                await self._run_task(step, outcome, context)
        except RecipeError as e:  # a template or condition that cannot be evaluated
            self._finish_step(outcome, result(Status.FAILED, str(e)))
        await self._writer.flush()  # the outcome is durable before dependants act on it
        faults.point("step-finished")

    async def _run_task(self, step: Step, outcome: StepOutcome, context: dict[str, Any]) -> None:
        prior = self._prior.pop(step.id, None)
        attempts = prior.attempts if prior else ()
        last = attempts[-1] if attempts else None
        update: TaskUpdate | None = None
        target = step.target
        if last is not None and not last.fenced and last.status == Status.SUCCEEDED:
            # It succeeded, but the run stopped before the step was closed: close it now.
            update, target = _prior_result(last), last.agent
        try:
            executor = await self._executor_for(target)
        except MleError as e:
            self._finish_step(outcome, result(Status.FAILED, str(e)))
            return
        if update is not None:
            await self._conclude(step, outcome, executor, update)
            return
        inputs = self._inputs(step)
        if last is None or not last.unfinished:
            probe = self._request(step, executor, 0, inputs, context)
            if await self._cached(step, outcome, executor, probe):
                return
        update = await self._attempt_loop(step, outcome, executor, inputs, context, attempts)
        await self._conclude(step, outcome, executor, update)

    async def _attempt_loop(
        self,
        step: Step,
        outcome: StepOutcome,
        executor: Executor,
        inputs: Mapping[str, str],
        context: dict[str, Any],
        earlier: tuple[PriorAttempt, ...],
    ) -> TaskUpdate:
        number = max((a.attempt for a in earlier), default=0)
        resume = earlier[-1] if earlier and earlier[-1].unfinished else None
        update = result(Status.CANCELLED, "cancelled")
        for tried in range(step.retries.max + 1):
            if resume is not None and tried == 0:
                runner = await self._executor_for(resume.agent)
                update = await self._one(
                    step, outcome, runner, resume.attempt, inputs, context, resume.last_seq
                )
            else:
                number += 1
                update = await self._one(step, outcome, executor, number, inputs, context, None)
            if update.status == Status.CANCELLED and not self._cancelled.is_set():
                self.cancel(update.text or "cancelled on the agent")  # e.g. by `mle cancel`
            if update.status in (Status.SUCCEEDED, Status.CANCELLED) or self._cancelled.is_set():
                break
            if tried == step.retries.max:
                break
            delay = step.retries.delay(tried + 1)
            message = f"attempt {number} {update.state}; retry in {delay:g}s"
            self._set_status(outcome, Status.RETRYING, message)
            if await self._sleep_unless_cancelled(delay):
                return result(Status.CANCELLED, self._cancel_reason or "cancelled")
            executor = await self._executor_for(step.target)  # a fresh agent if it was lost
        return update

    async def _one(
        self,
        step: Step,
        outcome: StepOutcome,
        executor: Executor,
        number: int,
        inputs: Mapping[str, str],
        context: dict[str, Any],
        after_seq: int | None,
    ) -> TaskUpdate:
        """One attempt, holding a slot on its executor."""
        async with executor.slot():
            if self._cancelled.is_set():
                return result(Status.CANCELLED, self._cancel_reason or "cancelled")
            request = self._request(step, executor, number, inputs, context)
            try:
                await executor.ship(inputs.values(), self._store)
            except MleError as e:
                return result(Status.FAILED, str(e))

            def started() -> None:
                outcome.attempts, outcome.target = number, executor.name
                outcome.started = outcome.started or time.time()
                detail = f"on {executor.name}, attempt {number}"
                if after_seq is not None:
                    detail += " (re-attached)"
                self._set_status(outcome, Status.RUNNING, detail)

            return await self._attempts.run(executor, request, after_seq=after_seq, started=started)

    def _inputs(self, step: Step) -> dict[str, str]:
        inputs = {f.path: f.digest for f in self.plan.files}
        for need in step.needs:
            inputs.update({p: o.digest for p, o in self._steps[need].outputs.items()})
        return inputs

    def _request(
        self,
        step: Step,
        executor: Executor,
        attempt: int,
        inputs: Mapping[str, str],
        context: Mapping[str, Any],
    ) -> TaskRequest:
        return task_request(
            self.plan,
            step,
            run_id=self.run_id,
            target=executor.name,
            attempt=attempt,
            inputs=inputs,
            steps=context["steps"],
        )

    async def _cached(
        self, step: Step, outcome: StepOutcome, executor: Executor, probe: TaskRequest
    ) -> bool:
        """Reuse an earlier result with the same cache key; record the key either way."""
        files = {f.path: f.digest for f in self.plan.files}
        parts = caching.cache_parts(probe, files, executor.platform)
        key = caching.cache_key(parts)
        run_id, step_id, text = self.run_id, step.id, json.dumps(parts, sort_keys=True)
        self._write(lambda led: led.update_step(run_id, step_id, cache_key=key, cache_parts=text))
        if not (step.cache and self._options.use_cache):
            return False
        hit = caching.find_hit(self._reader, key, self._store, step.outputs)
        if hit is None:
            return False
        outcome.outputs, outcome.metrics = dict(hit.outputs), dict(hit.metrics)
        outcome.target = executor.name
        self._record_results(step.id, outcome)
        source = f"{hit.run_id}/{hit.step_id}"
        self._write(lambda led: led.update_step(run_id, step_id, cached_from=source))
        self._set_status(outcome, Status.CACHED, f"same inputs as run {source}")
        return True

    async def _conclude(
        self, step: Step, outcome: StepOutcome, executor: Executor, update: TaskUpdate
    ) -> None:
        if update.status == Status.SUCCEEDED:
            try:
                await executor.fetch((o.digest for o in update.outputs), self._store)
                outcome.outputs = {o.path: o for o in update.outputs}
                outcome.metrics = self._read_metrics(step, outcome)
            except MleError as e:
                update = result(Status.FAILED, str(e))
            else:
                self._record_results(step.id, outcome)
        self._finish_step(outcome, update)

    def _read_metrics(self, step: Step, outcome: StepOutcome) -> dict[str, Any]:
        if step.metrics is None:
            return {}
        output = outcome.outputs.get(step.metrics)
        where = f"step {step.id}: metrics file {step.metrics}"
        if output is None:
            raise MleError(f"{where} was not produced")
        if output.size > _MAX_METRICS_BYTES:
            raise MleError(f"{where} is {output.size} bytes; the limit is 1 MiB")
        try:
            data = json.loads(self._store.path_of(output.digest).read_bytes())
        except (OSError, ValueError) as e:
            raise MleError(f"{where} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise MleError(f"{where} must hold a JSON object, not {type(data).__name__}")
        return data

    def _record_results(self, step_id: str, outcome: StepOutcome) -> None:
        run_id, metrics = self.run_id, dict(outcome.metrics)
        records = [
            ArtifactRecord(run_id, step_id, o.path, o.digest, o.size)
            for o in outcome.outputs.values()
        ]

        def write(led: Ledger) -> None:
            led.record_artifacts(records)
            if metrics:
                led.record_metrics(run_id, step_id, metrics)

        self._write(write)

    # -- built-in steps ---------------------------------------------------------------------------

    async def _approve(self, step: Step, outcome: StepOutcome, context: dict[str, Any]) -> None:
        options = render_options(
            self.plan, step, run_id=self.run_id, target="local", steps=context["steps"]
        )
        run_id, step_id = self.run_id, step.id
        if gates.truthy(options.get("auto", False)):
            self._write(
                lambda led: led.record_approval(
                    run_id, step_id, decision="approved", who="auto", reason="with.auto is true"
                )
            )
            self._set_status(outcome, Status.SUCCEEDED, "approved automatically (with.auto)")
            return
        message = str(options.get("message") or "")
        wait = f"waiting for approval: mle approve {run_id} {step_id!r}"
        self._set_status(outcome, Status.WAITING, f"{message} ({wait})" if message else wait)
        await self._writer.flush()
        decision = await gates.wait_for_decision(
            self._reader, run_id, step_id, self._options.poll_interval, self._cancelled.is_set
        )
        if decision is None:
            self._set_status(outcome, Status.CANCELLED, self._cancel_reason)
            return
        status = Status.SUCCEEDED if decision.approved else Status.FAILED
        self._set_status(outcome, status, decision.describe())

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
        self._record_results(step.id, outcome)
        metric = options["metric"]
        self._set_status(
            outcome, Status.SUCCEEDED, f"picked {chosen.step_id} ({metric}={chosen.value:g})"
        )

    # -- cancellation and bookkeeping -------------------------------------------------------------

    async def _cancel_running(self) -> None:
        await self._cancelled.wait()
        await self._attempts.cancel_running(self._cancel_reason)

    async def _sleep_unless_cancelled(self, delay: float) -> bool:
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

    def _finish_step(self, outcome: StepOutcome, update: TaskUpdate) -> None:
        outcome.exit_code = update.exit_code
        outcome.finished = time.time()
        status = update.status if update.state else Status.FAILED
        self._set_status(outcome, status, update.text)

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


def task_request(
    plan: Plan,
    step: Step,
    *,
    run_id: str,
    target: str,
    attempt: int,
    inputs: Mapping[str, str],
    steps: Mapping[str, Any],
) -> TaskRequest:
    """One attempt of a step, rendered for a target: the command, its environment, its files."""
    rendered = render_step(plan, step, run_id=run_id, target=target, steps=steps)
    env = {
        **rendered.env,
        "MLE_RUN_ID": run_id,
        "MLE_STEP": step.id,
        "MLE_ATTEMPT": str(attempt),
        "MLE_TARGET": target,
    }
    if step.metrics:
        env["MLE_METRICS"] = step.metrics
    return TaskRequest(
        task_id=f"{run_id}.{step.id}.{attempt}",
        run_id=run_id,
        step=step.id,
        attempt=attempt,
        shell=rendered.shell,
        argv=rendered.argv,
        env=env,
        inputs=dict(inputs),
        outputs=step.outputs,
        timeout=step.timeout,
    )


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


def _prior_result(attempt: PriorAttempt) -> TaskUpdate:
    return TaskUpdate(
        attempt.last_seq,
        attempt.finished or time.time(),
        "result",
        state=attempt.status,
        text=attempt.message,
        exit_code=attempt.exit_code,
        outputs=attempt.outputs,
    )
