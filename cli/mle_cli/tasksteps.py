"""Task steps: the ones that run a command on an agent. Cache lookup, attempts with retries
(through the AttemptRunner), outputs and metrics brought back into the project store."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from mle_cli import caching
from mle_cli.attempts import AttemptRunner, result
from mle_cli.executor import Executor, OutputFile, TaskRequest, TaskUpdate
from mle_cli.ledger import ArtifactRecord, Ledger, LedgerWriter
from mle_cli.recipe import render_step
from mle_cli.recipe.plan import Plan, Step
from mle_cli.recovery import PriorAttempt, PriorStep
from mle_cli.states import Status
from mle_proto.errors import MleError
from mle_proto.store import ArtifactStore

__all__ = [
    "RunHost",
    "SchedulerOptions",
    "StepOutcome",
    "StepResults",
    "TaskSteps",
    "task_request",
]

ExecutorFactory = Callable[[str], Awaitable[Executor]]
_MAX_METRICS_BYTES = 1024 * 1024
_MAX_METRICS_DEPTH = 32


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


class StepResults(Mapping[str, dict[str, Any]]):
    """What templates and `when:` see of each step: read from its outcome when asked, not copied
    for every step that starts (which would cost O(N²) over a run)."""

    def __init__(self, outcomes: Mapping[str, StepOutcome]) -> None:
        self._outcomes = outcomes

    def __getitem__(self, step_id: str) -> dict[str, Any]:
        o = self._outcomes[step_id]
        return {"status": o.status.value, "metrics": dict(o.metrics), "outputs": list(o.outputs)}

    def __iter__(self) -> Iterator[str]:
        return iter(self._outcomes)

    def __len__(self) -> int:
        return len(self._outcomes)


class RunHost(Protocol):
    """What task steps need from the scheduler running them."""

    @property
    def cancelled(self) -> asyncio.Event:
        """Set once the run is cancelled."""
        ...

    @property
    def cancel_reason(self) -> str:
        """Why the run was cancelled."""
        ...

    def cancel(self, reason: str) -> None:
        """Cancel the run."""
        ...

    def set_status(self, outcome: StepOutcome, status: Status, detail: str) -> None:
        """Record and show a step's new status."""
        ...

    def finish_step(self, outcome: StepOutcome, update: TaskUpdate) -> None:
        """Record and show a step's final status."""
        ...

    async def sleep_unless_cancelled(self, delay: float) -> bool:
        """Sleep; True when the run was cancelled meanwhile."""
        ...


class TaskSteps:
    """Runs the task steps of one run."""

    def __init__(
        self,
        plan: Plan,
        run_id: str,
        *,
        host: RunHost,
        outcomes: Mapping[str, StepOutcome],
        attempts: AttemptRunner,
        executor_for: ExecutorFactory,
        writer: LedgerWriter,
        reader: Ledger,
        store: ArtifactStore,
        options: SchedulerOptions,
        prior: dict[str, PriorStep],
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self._host = host
        self._outcomes = outcomes
        self._attempts = attempts
        self._executor_for = executor_for
        self._writer = writer
        self._reader = reader
        self._store = store
        self._options = options
        self._prior = prior

    async def run(self, step: Step, outcome: StepOutcome, context: dict[str, Any]) -> None:
        prior = self._prior.pop(step.id, None)
        attempts = prior.attempts if prior else ()
        last = attempts[-1] if attempts else None
        update: TaskUpdate | None = None
        target = step.target
        if last is not None and not last.fenced and last.status == Status.SUCCEEDED:
            # It succeeded, but the run stopped before the step was closed: close it now.
            update, target = _prior_result(last), last.agent
        try:
            executor: Executor | None = await self._executor_for(target)
        except MleError as e:
            if update is not None or step.retries.max == 0:
                self._host.finish_step(outcome, result(Status.FAILED, str(e)))
                return
            executor = None  # no agent answers yet: the attempt loop asks again, with retries
        if update is not None and executor is not None:
            await self._conclude(step, outcome, executor, update)
            return
        inputs = self._inputs(step)
        if executor is not None and (last is None or not last.unfinished):
            probe = self._request(step, executor, 0, inputs, context)
            if await self._cached(step, outcome, executor, probe):
                return
        update, executor = await self._attempt_loop(
            step, outcome, executor, inputs, context, attempts
        )
        if executor is None:  # no agent answered in any try
            self._host.finish_step(outcome, update)
            return
        await self._conclude(step, outcome, executor, update)

    async def _attempt_loop(
        self,
        step: Step,
        outcome: StepOutcome,
        executor: Executor | None,
        inputs: Mapping[str, str],
        context: dict[str, Any],
        earlier: tuple[PriorAttempt, ...],
    ) -> tuple[TaskUpdate, Executor | None]:
        """Attempts until one succeeds or the retries run out: the last result, and the
        executor it ran on (where its outputs are)."""
        number = max((a.attempt for a in earlier), default=0)
        resume = earlier[-1] if earlier and earlier[-1].unfinished else None
        update = result(Status.CANCELLED, "cancelled")
        for tried in range(step.retries.max + 1):
            after: int | None = None
            try:
                if resume is not None and tried == 0:
                    executor = await self._executor_for(resume.agent)
                    this, after = resume.attempt, resume.last_seq
                else:
                    if tried > 0 or executor is None:  # a fresh connection, or another agent
                        executor = None
                        executor = await self._executor_for(step.target)
                    number += 1
                    this = number
            except MleError as e:  # no agent to run it on: a failed try, retried like any other
                update = result(Status.FAILED, str(e))
            else:
                update = await self._one(step, outcome, executor, this, inputs, context, after)
            if update.status == Status.CANCELLED and not self._host.cancelled.is_set():
                # e.g. by `mle cancel`, which reaches the agents directly
                self._host.cancel(update.text or "cancelled on the agent")
            done = update.status in (Status.SUCCEEDED, Status.CANCELLED)
            if done or self._host.cancelled.is_set() or tried == step.retries.max:
                break
            delay = step.retries.delay(tried + 1)
            message = f"attempt {number} {update.state}; retry in {delay:g}s"
            self._host.set_status(outcome, Status.RETRYING, message)
            if await self._host.sleep_unless_cancelled(delay):
                return result(Status.CANCELLED, self._host.cancel_reason or "cancelled"), executor
        return update, executor

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
            if self._host.cancelled.is_set():
                return result(Status.CANCELLED, self._host.cancel_reason or "cancelled")
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
                self._host.set_status(outcome, Status.RUNNING, detail)

            return await self._attempts.run(executor, request, after_seq=after_seq, started=started)

    def _inputs(self, step: Step) -> dict[str, str]:
        inputs = {f.path: f.digest for f in self.plan.files}
        for need in step.needs:
            inputs.update({p: o.digest for p, o in self._outcomes[need].outputs.items()})
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
        self.record_results(step.id, outcome)
        source = f"{hit.run_id}/{hit.step_id}"
        self._write(lambda led: led.update_step(run_id, step_id, cached_from=source))
        self._host.set_status(outcome, Status.CACHED, f"same inputs as run {source}")
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
                self.record_results(step.id, outcome)
        self._host.finish_step(outcome, update)

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
        except RecursionError:  # step output is hostile: `[[[[...` a million deep
            raise MleError(_too_deep(where)) from None
        if not isinstance(data, dict):
            raise MleError(f"{where} must hold a JSON object, not {type(data).__name__}")
        if _depth(data) > _MAX_METRICS_DEPTH:  # the ledger stores and reloads it as JSON
            raise MleError(_too_deep(where))
        return data

    def record_results(self, step_id: str, outcome: StepOutcome) -> None:
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


def _too_deep(where: str) -> str:
    return f"{where} nests deeper than {_MAX_METRICS_DEPTH} levels; write flatter metrics"


def _depth(value: Any) -> int:
    """How deep JSON lists and objects nest in value, counted without recursion."""
    deepest, level = 0, [(value, 1)]
    while level:
        item, depth = level.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            level.extend((child, depth + 1) for child in children)
    return deepest
