"""Starting, driving and cancelling runs: the library behind `mle run` and `mle cancel`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from mle_cli import faults
from mle_cli.deploying import AgentDeployer
from mle_cli.executors import Executors
from mle_cli.ledger import Ledger, LedgerWriter
from mle_cli.recipe.plan import Plan
from mle_cli.recovery import load_prior
from mle_cli.scheduler import Progress, RunOutcome, Scheduler, SchedulerOptions
from mle_cli.settings import Settings
from mle_cli.states import FINAL, Status
from mle_cli.targets import resolve_target
from mle_proto.errors import (
    FailedPrecondition,
    InvalidInput,
    MleError,
    NotFound,
    UsageError,
)
from mle_proto.store import ArtifactStore

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "RunControl",
    "cancel_run",
    "execute_plan",
    "load_resumable",
    "new_run_id",
    "run_lock",
]


def new_run_id() -> str:
    """A sortable, readable, unique run id such as 20261122-153012-a3f9."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


class RunControl:
    """Cancels or detaches a run in flight (the CLI's Ctrl-C). A request that arrives before the
    run is ready to act on it is kept and applied as soon as it is."""

    def __init__(self) -> None:
        self._cancel: Callable[[str], None] | None = None
        self._detach: Callable[[], None] | None = None
        self._pending: tuple[str, str] | None = None  # ("cancel", reason) or ("detach", "")

    def cancel(self, reason: str) -> None:
        """Cancel the run."""
        if self._cancel is None:
            self._pending = self._pending or ("cancel", reason)
        else:
            self._cancel(reason)

    def detach(self) -> None:
        """Stop following the run; its tasks keep running."""
        if self._detach is None:
            self._pending = self._pending or ("detach", "")
        else:
            self._detach()

    def attach(self, cancel: Callable[[str], None], detach: Callable[[], None]) -> None:
        """Connect to the running run and apply a request that was waiting."""
        self._cancel, self._detach = cancel, detach
        if self._pending is not None:
            action, reason = self._pending
            if action == "cancel":
                self.cancel(reason)
            else:
                self.detach()


def load_resumable(
    settings: Settings, run_ref: str | None, recipe: Path | None = None
) -> tuple[Plan, str]:
    """The plan and id of a run that can be resumed; with `recipe`, the run must be of it."""
    if not settings.ledger_path.exists():
        raise NotFound("no runs yet; start one with `mle run RECIPE`")
    from mle_cli.recipe import plan_from_json

    ledger = Ledger(settings.ledger_path)
    try:
        run_id = ledger.resolve_run(run_ref)
        run = ledger.run(run_id)
    finally:
        ledger.close()
    if not run["plan"]:
        raise FailedPrecondition(f"run {run_id} was recorded without its plan; it cannot resume")
    plan = plan_from_json(run["plan"])
    # The run recorded its recipe as given, relative to where it started: the project, mostly.
    source = settings.project_dir / plan.source  # an absolute source stays itself
    if recipe is not None and _other_files(recipe, source):
        raise UsageError(
            f"run {run_id} was started from {plan.source}, not {recipe}",
            hint=f"mle resume {run_id}",
        )
    with run_lock(settings, run_id):  # fail now, before any progress is shown
        pass
    return plan, run_id


def _other_files(a: Path, b: Path) -> bool:
    """Whether both paths name files, and not the same one (a moved recipe is no proof)."""
    try:
        return not os.path.samefile(a, b)
    except OSError:
        return False


async def execute_plan(
    plan: Plan,
    settings: Settings,
    progress: Progress,
    *,
    run_id: str | None = None,
    control: RunControl | None = None,
    resume: bool = False,
    use_cache: bool = True,
) -> RunOutcome:
    """Record a new run of the plan in the ledger (or resume one) and drive it to a final state.
    A new run's plan is placed first (`mle_cli.planning.place`)."""
    run_id = run_id or new_run_id()
    store = ArtifactStore(settings.artifacts_dir)
    for shipped in plan.files:
        if store.has(shipped.digest):
            continue
        if resume or store.put_file(shipped.source)[0] != shipped.digest:
            what = "is no longer in the project store" if resume else "changed while starting"
            raise InvalidInput(f"{shipped.path} {what}; run the recipe again")
    with run_lock(settings, run_id):
        writer = LedgerWriter(settings.ledger_path)
        reader = Ledger(settings.ledger_path)
        executors = Executors(settings, writer)
        try:
            if resume:
                prior = load_prior(reader, run_id)
            else:
                prior = {}
                writer.submit(lambda led: _create_run(led, plan, run_id))
                await writer.flush()
                faults.point("run-created")
            options = SchedulerOptions(
                agent_grace=settings.agent_grace,
                poll_interval=settings.cancel_poll_interval,
                use_cache=use_cache,
            )
            scheduler = Scheduler(
                plan,
                run_id,
                executor_for=executors.get,
                writer=writer,
                reader=reader,
                store=store,
                progress=progress,
                options=options,
                prior=prior,
                deployer=AgentDeployer(settings),
            )
            return await _follow(settings, writer, scheduler, control)
        finally:
            await executors.close()
            reader.close()
            writer.close()


async def _follow(
    settings: Settings, writer: LedgerWriter, scheduler: Scheduler, control: RunControl | None
) -> RunOutcome:
    """Drive the scheduler, honouring Ctrl-C (cancel or detach) and `mle cancel`."""
    driving = asyncio.create_task(scheduler.run())
    detached = asyncio.Event()

    def detach() -> None:
        detached.set()
        driving.cancel()

    if control is not None:
        control.attach(scheduler.cancel, detach)
    watcher = asyncio.create_task(_watch_cancel_requests(settings, scheduler.run_id, scheduler))
    try:
        return await driving
    except asyncio.CancelledError:
        if not detached.is_set():
            raise
        return await _detach(writer, scheduler.run_id, scheduler)
    finally:
        watcher.cancel()


@contextlib.contextmanager
def run_lock(settings: Settings, run_id: str) -> Iterator[None]:
    """Only one process drives a run at a time; the lock dies with its process."""
    path = settings.mle_dir / "runs" / f"{run_id}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FailedPrecondition(
                f"run {run_id} is being driven by {holder}; wait for it, or `mle cancel {run_id}`"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"mle pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


async def _detach(writer: LedgerWriter, run_id: str, scheduler: Scheduler) -> RunOutcome:
    message = "detached: its tasks keep running on their agents"
    writer.submit(lambda led: led.update_run(run_id, status=Status.DETACHED, message=message))
    await writer.flush()
    return RunOutcome(run_id, Status.DETACHED, scheduler.outcomes, 0.0)


def _create_run(ledger: Ledger, plan: Plan, run_id: str) -> None:
    from mle_cli.recipe import plan_to_json

    ledger.create_run(
        run_id,
        recipe=plan.name,
        source=str(plan.source),
        recipe_digest=plan.digest,
        params=dict(plan.params),
        steps=[(s.id, s.target, s.needs) for s in plan.steps],
        plan=plan_to_json(plan),
        plan_hash=plan.hash,
    )


async def _watch_cancel_requests(settings: Settings, run_id: str, scheduler: Scheduler) -> None:
    """Honour `mle cancel` from another process, which flags the run in the ledger."""
    ledger = Ledger(settings.ledger_path)
    try:
        while True:
            await asyncio.sleep(settings.cancel_poll_interval)
            row = ledger.conn.execute(
                "SELECT cancel_requested FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row and row[0]:
                scheduler.cancel("cancelled by `mle cancel`")
                return
    finally:
        ledger.close()


def cancel_run(settings: Settings, run_ref: str | None, wait: float = 5.0) -> Mapping[str, object]:
    """Cancel a run: flag it, kill its running tasks, and close it if no `mle run` drives it."""
    if not settings.ledger_path.exists():
        raise NotFound("no runs yet; start one with `mle run RECIPE`")
    ledger = Ledger(settings.ledger_path)
    try:
        run_id = ledger.resolve_run(run_ref)
        run = ledger.run(run_id)
        if run["status"] in FINAL:
            return {"run": run_id, "status": run["status"], "changed": False}
        ledger.request_cancel(run_id)
        running = [a for a in ledger.attempts(run_id) if a["status"] == Status.RUNNING]
        asyncio.run(_cancel_tasks(settings, running))
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and ledger.run(run_id)["status"] not in FINAL:
            time.sleep(0.1)
        if ledger.run(run_id)["status"] not in FINAL:  # nobody drives it: close it ourselves
            ledger.finish_abandoned_run(run_id, Status.CANCELLED, "cancelled by `mle cancel`")
        return {"run": run_id, "status": ledger.run(run_id)["status"], "changed": True}
    finally:
        ledger.close()


async def _cancel_tasks(settings: Settings, attempts: list[dict[str, object]]) -> None:
    from mle_cli.targets.connection import connect

    for attempt in attempts:
        try:
            endpoint = resolve_target(str(attempt["agent"]), settings, start=False)
            conn = await connect(endpoint, settings.rpc_timeout)
        except MleError:
            continue  # its agent is gone, and so is the task
        try:
            await conn.cancel(str(attempt["task_id"]), "cancelled by `mle cancel`")
        except MleError:
            pass
        finally:
            await conn.close()
