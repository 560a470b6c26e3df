"""`mle models`: what each agent serves, with live stats; the stats are also kept in the ledger."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from mle_cli.ledger import Ledger, deployments
from mle_cli.models._client import open_client
from mle_cli.models.routes import describe_route, route_from_pb, traffic
from mle_cli.settings import Settings
from mle_cli.targets import LOCAL, Endpoint, known_targets, resolve_target
from mle_proto.errors import MleError, NotFound
from mle_proto.v1 import agent_pb2 as pb

__all__ = ["Listing", "list_models", "model_dict"]

# Stats copied into the ledger, as the agent reports them (seconds, counts).


@dataclass(frozen=True)
class Listing:
    """The models of each reachable target, and a line for each target skipped, saying why."""

    models: list[dict[str, Any]]
    skipped: tuple[str, ...] = ()


def list_models(settings: Settings, target: str | None = None) -> Listing:
    """Models on one target (starting its local agent if needed) or on every running one."""
    endpoints, skipped = _endpoints(settings, target)
    models = []
    for endpoint in endpoints:
        try:
            statuses = asyncio.run(_statuses(endpoint, settings))
        except MleError as e:  # one agent down or untrusted must not hide the others
            if target is not None:
                raise
            skipped.append(f"{endpoint.name}: {e}")
            continue
        models += [model_dict(endpoint.name, status) for status in statuses]
    if models:
        _record_stats(settings, models)
    return Listing(models, tuple(skipped))


def model_dict(target: str, status: pb.ModelStatus) -> dict[str, Any]:
    """A model's status as plain data: route and one entry per version with its stats."""
    route = route_from_pb(status.route)
    return {
        "target": target,
        "name": status.name,
        "route": route.to_dict(),
        "route_text": describe_route(route),
        "versions": [
            {**_version_dict(v), "traffic": traffic(route, v.version)}
            for v in sorted(status.versions, key=lambda v: v.version)
        ],
    }


_NOT_RUNNING = "no agent running (start it with `mle agent start --local`)"


def _endpoints(settings: Settings, target: str | None) -> tuple[list[Endpoint], list[str]]:
    if target is not None:
        return [resolve_target(target, settings)], []
    endpoints, skipped = [], []
    for name in known_targets(settings):
        try:  # listing everything must not start agents as a side effect
            endpoints.append(resolve_target(name, settings, start=False))
        except NotFound as e:
            skipped.append(f"{name}: {_NOT_RUNNING if name == LOCAL else e}")
    return endpoints, skipped


async def _statuses(endpoint: Endpoint, settings: Settings) -> list[pb.ModelStatus]:
    async with open_client(endpoint, settings.rpc_timeout) as client:
        return sorted(await client.models(), key=lambda m: m.name)


def _version_dict(version: pb.VersionStatus) -> dict[str, Any]:
    stats = version.stats
    return {
        "version": version.version,
        "state": pb.VersionState.Name(version.state).removeprefix("VERSION_STATE_").lower(),
        "runtime": version.runtime,
        "digest": version.digest,
        "filename": version.filename,
        "size": version.size_bytes,
        "created": version.created or None,
        "source_run": version.source_run or None,
        "source_step": version.source_step or None,
        "message": version.message or None,
        "batching": _batching(version.batching),
        "inputs": [_tensor(t) for t in version.inputs],
        "outputs": [_tensor(t) for t in version.outputs],
        "stats": {name: getattr(stats, name) for name in deployments.STATS},
    }


def _batching(batching: pb.Batching) -> dict[str, Any] | None:
    if batching.max_batch_size <= 1:
        return None
    return {
        "max_batch_size": batching.max_batch_size,
        "max_queue_delay_seconds": batching.max_queue_delay_seconds,
    }


def _tensor(tensor: pb.TensorInfo) -> dict[str, Any]:
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _record_stats(settings: Settings, models: list[dict[str, Any]]) -> None:
    ledger = Ledger(settings.ledger_path)
    now = time.time()
    try:
        with ledger.transaction():
            for model in models:
                for version in model["versions"]:
                    deployments.record_model_stats(
                        ledger,
                        model["target"],
                        model["name"],
                        version["version"],
                        version["stats"],
                        at=now,
                    )
    finally:
        ledger.close()
