"""Driving a run from a terminal: progress display, Ctrl-C (cancel or detach), the summary."""

from __future__ import annotations

import asyncio
import signal
import sys
from contextlib import nullcontext

from mle_cli import render
from mle_cli.errors import RunFailed
from mle_cli.planning import check_placement
from mle_cli.recipe.plan import Plan
from mle_cli.runs import RunControl, execute_plan, new_run_id
from mle_cli.scheduler import RunOutcome
from mle_cli.settings import Settings
from mle_cli.states import Status

__all__ = ["drive_run", "report_outcome"]


def drive_run(
    plan: Plan,
    settings: Settings,
    *,
    live: bool | None,
    resume: str | None = None,
    use_cache: bool = True,
) -> RunOutcome:
    """Run the plan (or resume the run `resume`) with progress on stderr; Ctrl-C asks whether
    to cancel or detach."""
    check_placement(plan)  # a bad target is a recipe error, reported before any progress
    run_id = resume or new_run_id()
    live = sys.stderr.isatty() if live is None else live
    progress: render.LiveProgress | render.PlainProgress
    verb = "resuming run" if resume else "run"
    if live:
        progress = render.LiveProgress([s.id for s in plan.steps], f"{verb} {run_id} ({plan.name})")
    else:
        progress = render.PlainProgress()
        sys.stderr.write(f"{verb} {run_id} ({plan.name}): {len(plan.steps)} steps\n")
    options = {"resume": resume is not None, "use_cache": use_cache}
    with progress if isinstance(progress, render.LiveProgress) else nullcontext():
        return asyncio.run(_drive(plan, settings, progress, run_id, options))


async def _drive(
    plan: Plan,
    settings: Settings,
    progress: render.LiveProgress | render.PlainProgress,
    run_id: str,
    options: dict[str, bool],
) -> RunOutcome:
    control = RunControl()
    loop = asyncio.get_running_loop()
    asking: list[asyncio.Task[None]] = []

    async def ask() -> None:
        progress.pause()
        choice = await asyncio.to_thread(_prompt, run_id)
        progress.resume()
        if choice == "detach":
            control.detach()
        elif choice == "cancel":
            control.cancel("cancelled by Ctrl-C")

    def on_interrupt() -> None:
        if asking or not sys.stdin.isatty():  # second Ctrl-C, or nobody to ask: cancel
            control.cancel("cancelled by Ctrl-C")
            return
        asking.append(asyncio.create_task(ask()))

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await execute_plan(
            plan, settings, progress, run_id=run_id, control=control, **options
        )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in asking:
            task.cancel()


def _prompt(run_id: str) -> str:
    sys.stderr.write(
        f"\nInterrupted. [c]ancel run {run_id}, [d]etach (its tasks keep running), "
        "or [r]esume watching? [c/d/r] "
    )
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip().lower()
    except (OSError, ValueError):
        return "cancel"
    return {"d": "detach", "r": "resume"}.get(answer[:1], "cancel")


def report_outcome(outcome: RunOutcome, settings: Settings, *, json_out: bool) -> None:
    """Print the run's summary; raise RunFailed when it did not succeed."""
    if json_out:
        from mle_cli.history import run_detail
        from mle_cli.ledger import Ledger

        ledger = Ledger(settings.ledger_path)
        try:
            render.print_json(run_detail(ledger, settings, outcome.run_id))
        finally:
            ledger.close()
    else:
        render.print_outcome(outcome)
    if outcome.status == Status.DETACHED:
        return
    if outcome.status == Status.CANCELLED:
        raise RunFailed(f"run {outcome.run_id} was cancelled")
    if outcome.status != Status.SUCCEEDED:
        raise RunFailed(_failure_line(outcome), hint=f"mle show {outcome.run_id}")


def _failure_line(outcome: RunOutcome) -> str:
    failed = outcome.failed_steps
    if not failed:
        return f"run {outcome.run_id} failed"
    step = failed[0]
    exited = step.status == Status.FAILED and step.exit_code
    how = f"exited with {step.exit_code}" if exited else step.status.value
    detail = f": {step.message}" if step.message and not exited else ""
    return f"run {outcome.run_id} failed: step {step.step_id} {how} on {step.target}{detail}"
