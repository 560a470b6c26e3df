"""Driving a run from a terminal: progress display, Ctrl-C (cancel or detach), the summary."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext

from mle_cli import render
from mle_cli.approvals import decide
from mle_cli.errors import RunFailed
from mle_cli.planning import place
from mle_cli.recipe.plan import Plan
from mle_cli.runs import RunControl, execute_plan, new_run_id
from mle_cli.scheduler import RunOutcome
from mle_cli.settings import Settings
from mle_cli.states import Status
from mle_proto.errors import MleError

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
    if resume is None:  # a bad target is a recipe error, reported before any progress
        plan = place(plan, settings)
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

    async def ask_approval(step_id: str, detail: str) -> None:
        progress.pause()
        answer = await asyncio.to_thread(_approval_prompt, run_id, step_id, detail)
        progress.resume()
        if answer is not None:
            approved, reason = answer
            with contextlib.suppress(MleError):  # decided meanwhile by `mle approve` elsewhere
                await asyncio.to_thread(
                    decide, settings, run_id, step_id, approved=approved, reason=reason
                )

    def on_waiting(step_id: str, detail: str) -> None:
        if sys.stdin.isatty():
            asking.append(asyncio.create_task(ask_approval(step_id, detail)))

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await execute_plan(
            plan,
            settings,
            _Gatekeeper(progress, on_waiting),
            run_id=run_id,
            control=control,
            **options,
        )
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        for task in asking:
            task.cancel()


class _Gatekeeper:
    """Passes progress on; tells the terminal when an approval gate starts waiting."""

    def __init__(
        self,
        inner: render.LiveProgress | render.PlainProgress,
        on_waiting: Callable[[str, str], None],
    ) -> None:
        self._inner = inner
        self._on_waiting = on_waiting

    def step_changed(self, step_id: str, status: Status, detail: str) -> None:
        self._inner.step_changed(step_id, status, detail)
        if status == Status.WAITING:
            self._on_waiting(step_id, detail)

    def step_log(self, step_id: str, stream: str, text: str) -> None:
        self._inner.step_log(step_id, stream, text)


def _approval_prompt(run_id: str, step_id: str, detail: str) -> tuple[bool, str] | None:
    """Ask at an approval gate: (approved, reason), or None to decide later."""
    sys.stderr.write(
        f"\nRun {run_id} waits at {step_id}: {detail}\n"
        "Approve? [y]es, [n]o, or [l]ater (mle approve from anywhere) [y/n/l] "
    )
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline().strip().lower()[:1]
        if answer not in ("y", "n"):
            return None
        sys.stderr.write("Reason (optional): ")
        sys.stderr.flush()
        reason = sys.stdin.readline().strip()
    except (OSError, ValueError):
        return None
    return answer == "y", reason


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
