"""Lineage of deployed model versions, from the ledger alone (no agent is asked).

`mle models --lineage digits@3` walks back from the deployments row of that version: the run and
the step whose output the file was (source_run, source_step), then the chain of needs back to
the data, each step with the digests of its inputs (kept in the step's cache_parts), its outputs
and its metrics; and where the same file is deployed now. `mle show RUN` lists the deployments
of the files a run produced (`run_models`).

"Now" is what the ledger last recorded: every deploy, route change, rollback and undeploy made
through mle is a deployments row, so the latest one with a route says what a model serves.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mle_cli.ledger import Ledger, deployments, queries
from mle_cli.models.routes import RouteSpec, describe_route
from mle_cli.settings import Settings
from mle_proto.errors import NotFound, UsageError

__all__ = [
    "ModelRef",
    "lineage_of",
    "model_lineage",
    "parse_model_ref",
    "placements",
    "route_role",
    "run_models",
]

Row = dict[str, Any]

# A plain `{{ params.x }}` or `{{ matrix.x }}` in a command; anything else is shown as written.
_VALUE = re.compile(r"\{\{\s*(?P<space>params|matrix)\.(?P<name>\w+)\s*\}\}")
_REF = re.compile(r"(?P<name>[a-z0-9][a-z0-9_.-]*)(?:@(?P<version>\d+|latest))?")


@dataclass(frozen=True)
class ModelRef:
    """A deployed model version as the operator names it: `digits@3`, `digits` (the latest)."""

    name: str
    version: int | None = None  # None: the latest deployed

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_model_ref(text: str) -> ModelRef:
    """`digits@3` -> ModelRef("digits", 3); `digits` or `digits@latest` -> the latest."""
    match = _REF.fullmatch(text.strip())
    if match is None:
        raise UsageError(
            f"invalid model version {text!r}: write NAME@VERSION, e.g. digits@3",
            hint="`mle models` lists the deployed versions",
        )
    version = match["version"]
    return ModelRef(match["name"], None if version in (None, "latest") else int(version))


def lineage_of(settings: Settings, ref_text: str, target: str | None = None) -> dict[str, Any]:
    """`mle models --lineage`: the lineage of a deployed version, read from the project's ledger."""
    ref = parse_model_ref(ref_text)
    if not settings.ledger_path.exists():
        raise NotFound("no deployments yet: the ledger is empty; deploy with `mle deploy`")
    ledger = Ledger(settings.ledger_path)
    try:
        return model_lineage(ledger, ref, target)
    finally:
        ledger.close()


def model_lineage(ledger: Ledger, ref: ModelRef, target: str | None = None) -> dict[str, Any]:
    """The deployment of a version, the run and steps that made its file, and where it serves."""
    row, targets = _deployed(ledger, ref, target)
    source = {"run": row["source_run"], "step": row["source_step"]} if row["source_run"] else None
    lineage: dict[str, Any] = {
        "model": row["model"],
        "version": row["version"],
        "digest": row["digest"],
        "file": row["filename"],
        "size": row["size"],
        "runtime": row["runtime"],
        "deployments": [_deployment(r) for r in targets],
        "source": source,
        "run": None,
        "missing": None,  # why the run is not shown, when a run made the file
        "files": {},
        "steps": [],
        "placements": placements(ledger, row["digest"]) if row["digest"] else [],
    }
    if source is not None:
        lineage.update(_run_lineage(ledger, source["run"], source["step"] or "", row["digest"]))
    return lineage


def run_models(ledger: Ledger, run_id: str) -> list[dict[str, Any]]:
    """Deployments of the files a run produced, oldest first, each with its state now."""
    rows = list(
        ledger.query("SELECT * FROM deployments WHERE source_run = ? ORDER BY id", [run_id])
    )
    history = _histories(ledger, {(r["target"], r["model"]) for r in rows})
    return [
        {
            "model": r["model"],
            "version": r["version"],
            "target": r["target"],
            "action": r["action"]
            if r["created"] or r["action"] != "deploy"
            else "already deployed",
            "step": r["source_step"],
            "file": r["filename"],
            "digest": r["digest"],
            "time": r["time"],
            "now": _state(history[(r["target"], r["model"])], r["version"], r["id"])[0],
        }
        for r in rows
    ]


def placements(ledger: Ledger, digest: str) -> list[dict[str, Any]]:
    """Every (target, model, version) this file was deployed as, with what it does now."""
    rows = list(
        ledger.query(
            "SELECT * FROM deployments WHERE digest = ? AND action = 'deploy' ORDER BY id",
            [digest],
        )
    )
    latest = {(r["target"], r["model"], r["version"]): r for r in rows}
    history = _histories(ledger, {(t, m) for t, m, _ in latest})
    found = []
    for (target, model, version), row in sorted(latest.items()):
        state, route = _state(history[(target, model)], version, row["id"])
        found.append(
            {"target": target, "model": model, "version": version, "state": state, "route": route}
        )
    return found


def route_role(route: RouteSpec, version: int) -> str:
    """What a version does in a route: serving 100%, serving 10%, shadow, ...; else not routed."""
    roles = []
    share = route.percent(version)
    if share > 0 and route.policy != "consensus":
        roles.append(f"serving {share:g}%")
    if route.policy == "consensus" and version in route.members:
        roles.append("consensus member")
    if route.policy == "fallback" and route.secondary == version:
        roles.append("fallback for late calls")
    if route.shadow == version:
        roles.append("shadow")
    return ", ".join(roles) or "loaded, not routed"


# -- the deployment -------------------------------------------------------------------------------


def _deployed(ledger: Ledger, ref: ModelRef, target: str | None) -> tuple[Row, list[Row]]:
    """The deploy row of the version (the latest, when on several targets), and the one on each
    target that has it: the row that created the version there, else the latest."""
    on = f" on {target}" if target else ""
    rows = [
        r
        for r in deployments.deployments(ledger, target=target, model=ref.name)
        if r["action"] == "deploy" and r["version"] is not None
    ]
    if not rows:
        raise NotFound(
            f"{ref.name} was never deployed{on} (the ledger has no deployment of it)",
            hint="`mle models` lists what each agent serves",
        )
    version = ref.version if ref.version is not None else rows[-1]["version"]
    chosen = [r for r in rows if r["version"] == version]
    if ref.version is None:  # the latest: that file, wherever it has this version number
        chosen = [r for r in chosen if r["digest"] == rows[-1]["digest"]]
    if not chosen:
        known = ", ".join(str(v) for v in sorted({r["version"] for r in rows}))
        raise NotFound(f"{ref.name}@{version} was never deployed{on} (deployed versions: {known})")
    by_target: dict[str, Row] = {}
    for row in chosen:  # the row that created the version wins over later no-op redeploys
        earlier = by_target.get(row["target"])
        if earlier is None or row["created"] or not earlier["created"]:
            by_target[row["target"]] = row
    if len({r["digest"] for r in by_target.values()}) > 1:
        names = ", ".join(sorted(by_target))
        raise UsageError(
            f"{ref.name}@{version} is a different file on {names}",
            hint="choose one with --target",
        )
    latest = max(by_target.values(), key=lambda r: r["id"])
    return latest, sorted(by_target.values(), key=lambda r: r["id"])


def _deployment(row: Row) -> dict[str, Any]:
    return {
        "target": row["target"],
        "agent": row["agent"],
        "time": row["time"],
        "operator": row["operator"],
        "created": row["created"],
    }


def _histories(ledger: Ledger, keys: set[tuple[str, str]]) -> dict[tuple[str, str], list[Row]]:
    return {(t, m): deployments.deployments(ledger, target=t, model=m) for t, m in keys}


def _state(history: Sequence[Row], version: int, since_id: int) -> tuple[str, str]:
    """A version's role now (after the deploy row `since_id`) and the model's route, as text."""
    later = [r for r in history if r["id"] > since_id]
    if any(r["action"] == "undeploy" and r["version"] in (None, version) for r in later):
        return "undeployed", ""
    routes = [r["route"] for r in history if r["route"] is not None]
    if not routes:
        return "loaded, not routed", ""
    route = _route(routes[-1])
    return route_role(route, version), describe_route(route)


def _route(data: Mapping[str, Any]) -> RouteSpec:
    """A RouteSpec back from its ledger JSON (RouteSpec.to_dict)."""
    return RouteSpec(
        policy=str(data.get("policy") or "split"),
        split=tuple((int(s["version"]), float(s["percent"])) for s in data.get("split") or ()),
        shadow=int(data.get("shadow") or 0),
        secondary=int(data.get("secondary") or 0),
        deadline=float(data.get("deadline_seconds") or 0.0),
        members=tuple(int(m) for m in data.get("members") or ()),
    )


# -- the run --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunRecords:
    """What the ledger holds about one run, by step id."""

    params: Mapping[str, Any]
    definitions: Mapping[str, Mapping[str, Any]]  # from the run's plan
    steps: Mapping[str, Row]
    metrics: Mapping[str, Mapping[str, Any]]
    outputs: Mapping[str, list[dict[str, Any]]]


def _run_lineage(ledger: Ledger, run_id: str, step_id: str, digest: str) -> dict[str, Any]:
    """The run, its shipped files, and the chain of steps that led to `step_id`."""
    try:
        run = ledger.run(run_id)
    except NotFound:
        return {"missing": f"run {run_id} is no longer in this ledger"}
    plan = _plan(run.get("plan"))
    outputs: dict[str, list[dict[str, Any]]] = {}
    for out in ledger.artifacts(run_id):
        entry = {"path": out["path"], "digest": out["digest"], "size": out["size"]}
        outputs.setdefault(out["step_id"], []).append(entry)
    records = _RunRecords(
        params=run["params"],
        definitions=_plan_steps(plan),
        steps={s["step_id"]: s for s in ledger.steps(run_id)},
        metrics=queries.metrics(ledger, run_id),
        outputs=outputs,
    )
    shown = ("id", "recipe", "source", "params", "status", "created", "started", "finished")
    return {
        "run": {key: run[key] for key in shown} | {"message": run["message"]},
        "files": _shipped(plan),
        "steps": [_step_entry(records, s, digest) for s in _chain(step_id, records)],
    }


def _chain(last: str, records: _RunRecords) -> list[str]:
    """`last` and its upstream steps, needs first; through mle/select, only the one picked."""
    order: list[str] = []

    def visit(step_id: str) -> None:
        if step_id in order or step_id not in records.steps:
            return
        for need in _followed(step_id, records):
            visit(need)
        order.append(step_id)

    visit(last)
    return order


def _followed(step_id: str, records: _RunRecords) -> list[str]:
    needs: list[str] = list(records.steps[step_id]["needs"])
    picked = records.metrics.get(step_id, {}).get("selected")
    return [picked] if picked in needs else needs


def _step_entry(records: _RunRecords, step_id: str, digest: str) -> dict[str, Any]:
    """One step of the chain: how it ran, the digests of its inputs, its outputs and metrics."""
    step, plan = records.steps[step_id], records.definitions.get(step_id, {})
    parts = json.loads(step["cache_parts"]) if step.get("cache_parts") else {}
    own = dict(records.metrics.get(step_id, {}))
    outputs = records.outputs.get(step_id, [])
    entry: dict[str, Any] = {
        "step": step_id,
        "status": step["status"],
        "target": step["target"],
        "uses": plan.get("uses"),
        "command": _command(plan, records.params),
        "matrix": dict(plan.get("matrix") or []),
        "inputs": dict(parts.get("inputs") or {}),
        "outputs": outputs,
        "metrics": own,
        "cached_from": step.get("cached_from"),
        "made": next((o["path"] for o in outputs if o["digest"] == digest), None),
    }
    if own.get("selected") in step["needs"]:
        metric = dict(plan.get("options") or []).get("metric")
        entry["selected_by"] = metric
        entry["candidates"] = {
            need: records.metrics.get(need, {}).get(metric) if metric else None
            for need in step["needs"]
        }
    return entry


def _command(plan: Mapping[str, Any], params: Mapping[str, Any]) -> str | None:
    """The step's command with its params and matrix values filled in (for reading, not running:
    the run quoted them for the shell)."""
    argv = plan.get("argv")
    text = str(plan["run"]) if plan.get("run") else " ".join(map(str, argv)) if argv else None
    if text is None:
        return None
    values = {"params": params, "matrix": dict(plan.get("matrix") or [])}

    def value(match: re.Match[str]) -> str:
        found = values[match["space"]].get(match["name"], match[0])
        return json.dumps(found) if isinstance(found, bool) else str(found)

    return _VALUE.sub(value, text)


def _plan_steps(data: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The plan's step definitions by id (read loosely: only display fields are used)."""
    return {str(s.get("id")): s for s in data.get("steps") or [] if isinstance(s, dict)}


def _shipped(data: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(f["path"]): str(f["digest"]) for f in data.get("files") or [] if isinstance(f, dict)
    }


def _plan(text: str | None) -> dict[str, Any]:
    """The run's plan JSON, or {} for a run recorded without one."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
