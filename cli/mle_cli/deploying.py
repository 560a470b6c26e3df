"""The mle/deploy step on the operator's side: its options rendered, its files found among the
results of the steps it needs, its targets matched, the rollout run by a Deployer, and the outcome
recorded (metrics on the step, every deploy and rollback in the deployments table).

The scheduler knows only the Deployer interface; `AgentDeployer` is the one that talks to agents
(it imports grpc lazily, when a run has a deploy step).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from mle_cli.attempts import result
from mle_cli.errors import RecipeError
from mle_cli.ledger import DeploymentRecord, Ledger, LedgerWriter, deployments
from mle_cli.placement import describe_targets, matching
from mle_cli.recipe import DeploySpec, OptionProblem, deploy_spec, render_options
from mle_cli.recipe.plan import Plan, Step
from mle_cli.settings import Settings
from mle_cli.states import Status
from mle_cli.targets.fleet import Target
from mle_cli.tasksteps import RunHost, StepOutcome
from mle_proto.errors import MleError, NotFound, UsageError
from mle_proto.store import ArtifactStore

if TYPE_CHECKING:
    from mle_cli.models.rollout import RolloutReport

__all__ = [
    "AgentDeployer",
    "DeployJob",
    "DeploySteps",
    "Deployer",
    "StoredFile",
    "matching_targets",
]

_GATES = ("mle/approve", "mle/select")  # they pass on the files of the steps they need
_GLOB = frozenset("*?[")


@dataclass(frozen=True)
class StoredFile:
    """A file in the project's artifact store: its work-dir path, and the step that produced it
    (empty for a shipped project file)."""

    path: str
    digest: str
    size: int
    step: str = ""


@dataclass(frozen=True)
class DeployJob:
    """One mle/deploy step, ready to roll out."""

    run_id: str
    spec: DeploySpec
    targets: tuple[str, ...]
    model: StoredFile
    smoke: StoredFile | None


class Deployer(Protocol):
    """Rolls a model out to targets."""

    def targets(self, placement: str, each: bool) -> list[str]:
        """The targets a step's `on:` (and `each:`) stands for."""
        ...

    async def deploy(
        self,
        job: DeployJob,
        store: ArtifactStore,
        record: Callable[[DeploymentRecord], None],
        stop: Callable[[], bool],
    ) -> RolloutReport:
        """Roll the model out; every change goes to `record`; stop between batches on `stop()`."""
        ...


def matching_targets(placement: str, targets: Sequence[Target], each: bool) -> list[str]:
    """The targets a placement selects: all matches with `each`, else exactly one."""
    matched = sorted(t.name for t in matching(placement, targets))
    if not matched:
        seen = describe_targets(targets)
        raise NotFound(f"no target matches {placement!r}; targets seen: {seen}")
    if not each and len(matched) > 1:
        raise UsageError(
            f"on: {placement!r} matches {len(matched)} targets ({', '.join(matched)}): "
            "add each: true to deploy to every one"
        )
    return matched


class AgentDeployer:
    """Deploys through the agents' Models and inference services."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def targets(self, placement: str, each: bool) -> list[str]:
        from mle_cli.targets.fleet import fleet_targets

        try:
            return matching_targets(placement, fleet_targets(self._settings), each)
        except NotFound:  # the mDNS cache ages while a run goes on: look again
            return matching_targets(placement, fleet_targets(self._settings, browse=True), each)

    async def deploy(
        self,
        job: DeployJob,
        store: ArtifactStore,
        record: Callable[[DeploymentRecord], None],
        stop: Callable[[], bool],
    ) -> RolloutReport:
        from mle_cli.models.deploy import ModelFile
        from mle_cli.models.rollout import RolloutPlan, roll_out

        spec, model = job.spec, job.model
        plan = RolloutPlan(
            name=spec.name,
            targets=job.targets,
            model=ModelFile(
                model.digest, model.size, model.path.rsplit("/", 1)[-1], job.run_id, model.step
            ),
            canary=spec.canary,
            version=spec.version,
            batch=spec.batch,
            max_failures=spec.max_failures,
            smoke=store.path_of(job.smoke.digest) if job.smoke else None,
            smoke_label=job.smoke.path if job.smoke else "",
            smoke_min_accuracy=spec.smoke_min_accuracy,
        )
        return await roll_out(self._settings, store, plan, record, stop)


class DeploySteps:
    """Runs the mle/deploy steps of one run."""

    def __init__(
        self,
        plan: Plan,
        run_id: str,
        *,
        host: RunHost,
        outcomes: Mapping[str, StepOutcome],
        writer: LedgerWriter,
        store: ArtifactStore,
        deployer: Deployer | None,
    ) -> None:
        self.plan = plan
        self.run_id = run_id
        self._host = host
        self._outcomes = outcomes
        self._writer = writer
        self._store = store
        self._deployer = deployer

    async def run(self, step: Step, outcome: StepOutcome, context: Mapping[str, Any]) -> None:
        """Roll the step's model out; the step fails with one line when the rollout stops."""
        if self._deployer is None:
            self._host.finish_step(outcome, result(Status.FAILED, "no deployer for mle/deploy"))
            return
        try:  # in a thread: finding the targets may browse mDNS, which blocks
            job = await asyncio.to_thread(self._job, step, context)
        except MleError as e:
            self._host.finish_step(outcome, result(Status.FAILED, str(e)))
            return
        outcome.started = outcome.started or time.time()
        outcome.target = ", ".join(job.targets)
        detail = f"deploying {job.spec.name} to {outcome.target}"
        self._host.set_status(outcome, Status.RUNNING, detail)
        try:
            report = await self._deployer.deploy(
                job, self._store, self._record, self._host.cancelled.is_set
            )
        except MleError as e:
            self._host.finish_step(outcome, result(Status.FAILED, str(e)))
            return
        outcome.metrics = dict(report.metrics)
        run_id, step_id, metrics = self.run_id, step.id, dict(report.metrics)
        self._writer.submit(lambda led: led.record_metrics(run_id, step_id, metrics))
        status = Status.SUCCEEDED if report.ok else Status.FAILED
        if not report.ok and self._host.cancelled.is_set():
            status = Status.CANCELLED  # stopped between batches, and rolled back
        self._host.finish_step(outcome, result(status, report.message))

    def _job(self, step: Step, context: Mapping[str, Any]) -> DeployJob:
        assert self._deployer is not None
        options = render_options(
            self.plan, step, run_id=self.run_id, target=step.target, steps=context["steps"]
        )
        try:
            spec = deploy_spec(options)
        except OptionProblem as problem:
            raise _error(step, problem.key, problem.message) from None
        model = self._placed(step, "model", spec.model, shipped=False)
        smoke = self._placed(step, "smoke", spec.smoke, shipped=True) if spec.smoke else None
        targets = tuple(self._deployer.targets(step.target, step.each))
        return DeployJob(self.run_id, spec, targets, model, smoke)

    def _placed(self, step: Step, key: str, path: str, *, shipped: bool) -> StoredFile:
        """A file the step's work dir would hold: an output of a need, or a shipped file."""
        for need in step.needs:
            found = self._outcomes[need].outputs.get(path)
            if found is not None:
                producer = self._producer(need, path, found.digest)
                return StoredFile(path, found.digest, found.size, producer)
        for f in self.plan.files if shipped else ():
            if f.path == path:
                return StoredFile(path, f.digest, f.size)
        what = "an output of a step it needs" + (" or a shipped file" if shipped else "")
        raise _error(step, key, f"{path!r} is not {what}")

    def _producer(self, step_id: str, path: str, digest: str) -> str:
        """The step that made a file, looking through the gates that passed it on."""
        step = self.plan.step(step_id)
        if step.uses in _GATES:
            for need in step.needs:
                found = self._outcomes[need].outputs.get(path)
                if found is not None and found.digest == digest:
                    return self._producer(need, path, digest)
        return step_id

    def _record(self, record: DeploymentRecord) -> None:
        self._writer.submit(lambda led: _insert(led, record))


def _insert(ledger: Ledger, record: DeploymentRecord) -> None:
    deployments.record_deployment(ledger, record)


def _error(step: Step, key: str, message: str) -> RecipeError:
    where = step.location
    return RecipeError(
        message, file=where.file, line=where.line, col=where.col, key=f"steps.{step.id}.with.{key}"
    )
