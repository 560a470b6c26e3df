"""The rollout behind the mle/deploy recipe step: deploy one model file to targets in batches,
smoke-test each target through the Open Inference Protocol, and when more than `max_failures`
targets fail, stop and roll back every target this rollout changed.

A target fails when its deploy fails (the agent keeps serving what it served) or its smoke test
does (its own change is undone at once). Undoing is a route rollback when the model was served
before, else an undeploy of the model. Every change is handed to `record` for the ledger.
"""

from __future__ import annotations

import asyncio
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_cli.ledger import DeploymentRecord
from mle_cli.models._client import ModelsClient, open_client
from mle_cli.models.deploy import (
    DeployOptions,
    ModelFile,
    deploy_file,
    rollback_route,
    undeploy_model,
)
from mle_cli.models.inputs import UNNAMED, TensorInfo, fit_inputs, require_numpy
from mle_cli.models.predict import classes, infer_request, reply_outputs
from mle_cli.models.routes import RouteChange, RouteSpec, route_from_pb
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint, resolve_target
from mle_proto.errors import Cancelled, InvalidInput, MleError, NotFound
from mle_proto.store import ArtifactStore

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Array = npt.NDArray[np.generic]

__all__ = ["Record", "RolloutPlan", "RolloutReport", "TargetResult", "load_smoke", "roll_out"]

Record = Callable[[DeploymentRecord], None]
_SMOKE_BATCH = 256  # rows per inference request, where the model takes any batch size


@dataclass(frozen=True)
class RolloutPlan:
    """What to deploy where: the model file, its name and route, the batches and the threshold."""

    name: str
    targets: tuple[str, ...]
    model: ModelFile
    canary: float = 0.0
    version: int = 0
    batch: int = 1
    max_failures: int = 0
    smoke: Path | None = None  # an .npz with the rows in X (or by input name) and labels in y
    smoke_label: str = ""  # how the smoke file is named to the user
    smoke_min_accuracy: float | None = None


@dataclass
class TargetResult:
    """What happened on one target."""

    target: str
    version: int = 0
    created: bool = False  # a new version was deployed
    changed: bool = False  # the agent serves differently: a new version, or a known one re-routed
    served_before: bool = False
    accuracy: float | None = None
    error: str = ""
    undone: str = ""  # rollback | undeploy, once this target's change was undone
    undo_error: str = ""


@dataclass(frozen=True)
class RolloutReport:
    """The rollout's outcome: one line for the step, and its metrics for the ledger."""

    ok: bool
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    results: tuple[TargetResult, ...] = ()


@dataclass(frozen=True)
class _Smoke:
    feed: Mapping[str, Array]
    labels: Array
    min_accuracy: float | None


async def roll_out(
    settings: Settings,
    store: ArtifactStore,
    plan: RolloutPlan,
    record: Record,
    stop: Callable[[], bool] = lambda: False,
    resolve: Callable[[str], Endpoint] | None = None,
) -> RolloutReport:
    """Deploy batch by batch; stop and roll back once more than max_failures targets failed, or
    once `stop()` turns true (checked between batches and between smoke requests). `resolve`
    finds a target's endpoint (default: the targets the project knows)."""
    smoke = None
    if plan.smoke is not None:
        smoke = load_smoke(plan.smoke, plan.smoke_label, plan.smoke_min_accuracy)
    find = resolve or (lambda target: resolve_target(target, settings))
    rollout = _Rollout(settings, store, plan, smoke, record, find, stop)
    results: list[TargetResult] = []
    for start in range(0, len(plan.targets), plan.batch):
        if not stop():
            batch = plan.targets[start : start + plan.batch]
            results += await asyncio.gather(*(rollout.deploy(t) for t in batch))
        if stop():  # also after the last batch: a cancelled run leaves nothing changed
            return await rollout.abort(results, "the run was cancelled")
        if sum(1 for r in results if r.error) > plan.max_failures:
            return await rollout.abort(results, "")
    return rollout.report(results, ok=True)


def load_smoke(path: Path, label: str, min_accuracy: float | None) -> _Smoke:
    """The smoke rows and labels; InvalidInput when the file cannot serve as a smoke test."""
    np = require_numpy()
    shown = label or str(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:
        raise InvalidInput(f"smoke file {shown}: not a .npz archive ({e})") from None
    if "y" not in arrays:
        raise InvalidInput(f"smoke file {shown}: needs the labels in 'y'")
    labels = arrays.pop("y").reshape(-1)
    feed = {UNNAMED: arrays["X"]} if "X" in arrays else arrays  # X: the model's one input
    if not feed or not len(labels):
        raise InvalidInput(f"smoke file {shown}: needs rows in 'X' and labels in 'y'")
    for name, rows in feed.items():
        if len(rows) != len(labels):
            shown_name = name or "X"
            raise InvalidInput(
                f"smoke file {shown}: {len(rows)} rows in {shown_name!r}, {len(labels)} labels"
            )
    return _Smoke(feed, labels, min_accuracy)


class _Rollout:
    def __init__(
        self,
        settings: Settings,
        store: ArtifactStore,
        plan: RolloutPlan,
        smoke: _Smoke | None,
        record: Record,
        resolve: Callable[[str], Endpoint],
        stop: Callable[[], bool],
    ) -> None:
        self.settings = settings
        self.store = store
        self.plan = plan
        self.smoke = smoke
        self.record = record
        self.resolve = resolve
        self.stop = stop

    async def deploy(self, target: str) -> TargetResult:
        """Deploy to one target and smoke-test it; a failed smoke test undoes its change."""
        result = TargetResult(target)
        try:
            endpoint = await asyncio.to_thread(self.resolve, target)
            async with open_client(endpoint, self.settings.rpc_timeout) as client:
                before = await _route(client, self.plan.name)
                result.served_before = before is not None
                options = DeployOptions(
                    model=self.plan.model.filename,
                    target=target,
                    name=self.plan.name,
                    version=self.plan.version,
                    route=RouteChange(canary=self.plan.canary),
                )
                args = (client, endpoint, self.settings, self.store, self.plan.model, options)
                outcome, record = await deploy_file(*args)
                self.record(record)
                result.version, result.created = outcome.version, outcome.created
                # A known file is not a new version, but the agent may route it now: undo that too.
                result.changed = outcome.created or outcome.route != before
                if self.smoke is not None:
                    result.accuracy = await _smoke_test(
                        client, self.plan.name, result, self.smoke, self.stop
                    )
        except MleError as e:
            result.error = str(e)
        if not result.error:
            result.error = self._smoke_failure(result)
        if result.error and result.changed:
            await self.undo(result)
        return result

    def _smoke_failure(self, result: TargetResult) -> str:
        wanted = self.smoke.min_accuracy if self.smoke else None
        if wanted is None or result.accuracy is None or result.accuracy >= wanted:
            return ""
        return f"smoke accuracy {result.accuracy:.3f} < {wanted:g}"

    async def undo(self, result: TargetResult) -> None:
        """Roll back what this rollout changed on a target (nothing when it changed nothing)."""
        if not result.changed or result.undone:
            return
        try:
            endpoint = await asyncio.to_thread(self.resolve, result.target)
            async with open_client(endpoint, self.settings.rpc_timeout) as client:
                if result.served_before:
                    outcome, record = await rollback_route(client, self.plan.name)
                else:
                    outcome, record = await undeploy_model(client, self.plan.name)
        except MleError as e:
            result.undo_error = str(e)
            return
        self.record(record)
        result.undone = outcome.action

    async def abort(self, results: list[TargetResult], reason: str) -> RolloutReport:
        """Undo every change of this rollout, then report why it stopped."""
        await asyncio.gather(*(self.undo(r) for r in results))
        return self.report(results, ok=False, reason=reason)

    def report(
        self, results: Sequence[TargetResult], *, ok: bool, reason: str = ""
    ) -> RolloutReport:
        serving = [r for r in results if not r.error and not r.undone]
        metrics: dict[str, Any] = {
            "model": self.plan.name,
            "deployed": len(serving),
            "targets": [r.target for r in serving],
            "versions": {r.target: r.version for r in results if r.version},
        }
        if self.smoke is not None:
            metrics["smoke_accuracy"] = {
                r.target: r.accuracy for r in results if r.accuracy is not None
            }
        failed = {r.target: r.error for r in results if r.error}
        if failed:
            metrics["failed"] = failed
        undone = [r.target for r in results if r.undone]
        if undone:
            metrics["rolled_back"] = undone
        message = self._success(serving, failed) if ok else self._failure(results, reason)
        return RolloutReport(ok, message, metrics, tuple(results))

    def _success(self, serving: Sequence[TargetResult], failed: Mapping[str, str]) -> str:
        parts = []
        for r in serving:
            smoke = f", smoke accuracy {r.accuracy:.3f}" if r.accuracy is not None else ""
            parts.append(f"{r.target} (v{r.version}{smoke})")
        message = f"deployed {self.plan.name} to " + ", ".join(parts)
        if failed:
            listed = "; ".join(f"{t}: {e}" for t, e in failed.items())
            message += f"; failed within max_failures={self.plan.max_failures}: {listed}"
        return message

    def _failure(self, results: Sequence[TargetResult], reason: str) -> str:
        failed = [r for r in results if r.error]
        total = len(self.plan.targets)
        if reason:
            head = f"rollout of {self.plan.name} stopped: {reason}"
        else:
            listed = "; ".join(f"{r.target}: {r.error}" for r in failed)
            head = (
                f"rollout of {self.plan.name} stopped: {len(failed)} of {total} "
                f"target{'s' if total != 1 else ''} failed ({listed})"
            )
        undone = [r.target for r in results if r.undone]
        message = f"{head}; rolled back: {', '.join(undone) or 'none'}"
        stuck = [r for r in results if r.undo_error]
        if stuck:
            message += "; could not roll back: " + "; ".join(
                f"{r.target}: {r.undo_error}" for r in stuck
            )
        tried = {r.target for r in results}
        untouched = [t for t in self.plan.targets if t not in tried]
        if untouched:
            message += f"; not attempted: {', '.join(untouched)}"
        return message


async def _route(client: ModelsClient, name: str) -> RouteSpec | None:
    """How the agent serves a model of this name now; None when it does not know the model."""
    try:
        found = [m for m in await client.models(name) if m.name == name]
    except NotFound:
        return None
    return route_from_pb(found[0].route) if found else None


async def _smoke_test(
    client: ModelsClient, name: str, result: TargetResult, smoke: _Smoke, stop: Callable[[], bool]
) -> float:
    """Accuracy of the deployed version on the smoke rows, asked through OIP ModelInfer."""
    version = str(result.version)
    metadata = await client.metadata(name, version)
    specs = [TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in metadata.inputs]
    fixed = [s.shape[0] for s in specs if s.shape and s.shape[0] > 0]
    rows = min(fixed) if fixed else _SMOKE_BATCH  # a fixed batch (TFLite: 1) is sent as is
    predicted: list[int] = []
    for start in range(0, len(smoke.labels), rows):
        if stop():  # a big smoke file on a slow model takes minutes: a cancel must not wait
            raise Cancelled(f"{name} v{version} on {result.target}: smoke test cancelled")
        part = {k: v[start : start + rows] for k, v in smoke.feed.items()}
        reply = await client.infer(infer_request(name, version, fit_inputs(part, specs)))
        outputs = reply_outputs(reply)
        labels = classes(outputs[reply.outputs[0].name]) if reply.outputs else None
        if labels is None:
            raise InvalidInput(
                f"{name} v{version} on {result.target}: its first output is not a "
                "classifier's scores ([rows, classes]), which a smoke test needs"
            )
        predicted += labels
    expected = [int(label) for label in smoke.labels]
    return sum(p == e for p, e in zip(predicted, expected, strict=True)) / len(expected)
