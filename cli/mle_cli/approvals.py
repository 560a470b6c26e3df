"""`mle approve`: record a decision for a run's approval gate."""

from __future__ import annotations

from typing import Any

from mle_cli.gates import operator_name
from mle_cli.ledger import Ledger, queries
from mle_cli.settings import Settings
from mle_cli.states import Status
from mle_proto.errors import FailedPrecondition, NotFound

__all__ = ["decide"]


def decide(
    settings: Settings, run_ref: str | None, step_id: str, *, approved: bool, reason: str = ""
) -> dict[str, Any]:
    """Approve or reject the gate `step_id` of a run; the run's scheduler picks it up."""
    if not settings.ledger_path.exists():
        raise NotFound("no runs yet; start one with `mle run RECIPE`")
    ledger = Ledger(settings.ledger_path)
    try:
        run_id = ledger.resolve_run(run_ref)
        step = _gate(ledger, run_id, step_id)
        if step["status"] == Status.SUCCEEDED:
            earlier = queries.approval(ledger, run_id, step_id)
            who = f" by {earlier['who']}" if earlier else ""
            raise FailedPrecondition(f"step {step_id} of run {run_id} is already approved{who}")
        decision = "approved" if approved else "rejected"
        who = operator_name()
        ledger.record_approval(run_id, step_id, decision=decision, who=who, reason=reason)
        return {"run": run_id, "step": step_id, "decision": decision, "who": who, "reason": reason}
    finally:
        ledger.close()


def _gate(ledger: Ledger, run_id: str, step_id: str) -> dict[str, Any]:
    from mle_cli.recipe import plan_from_json

    steps = {s["step_id"]: s for s in ledger.steps(run_id)}
    if step_id not in steps:
        raise NotFound(f"run {run_id} has no step {step_id!r}; `mle show {run_id}` lists them")
    plan_text = ledger.run(run_id)["plan"]
    if plan_text and plan_from_json(plan_text).step(step_id).uses != "mle/approve":
        raise FailedPrecondition(f"step {step_id} of run {run_id} is not an approval gate")
    return steps[step_id]
