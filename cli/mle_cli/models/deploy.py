"""`mle deploy`: ship a model file to an agent and serve it, or change a served model's route.

MODEL is a file (deploy a new version) or, when no such file exists, the name of a model the
agent serves (change its route). Every successful change is recorded in the ledger.

The async core (`deploy_file`, `rollback_route`, `undeploy_model`) works on an open client and
returns the ledger record without writing it: `mle deploy` and the mle/deploy step share it.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mle_cli.gates import operator_name
from mle_cli.ledger import DeploymentRecord, Ledger, deployments
from mle_cli.models._client import ModelsClient, open_client
from mle_cli.models.routes import (
    RouteChange,
    RouteSpec,
    plan_route,
    route_from_pb,
    route_to_pb,
)
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint, resolve_target
from mle_cli.targets.connection import connect
from mle_proto.errors import InvalidInput, NotFound, UsageError
from mle_proto.store import ArtifactStore
from mle_proto.v1 import agent_pb2 as pb

__all__ = [
    "DeployOptions",
    "DeployOutcome",
    "ModelFile",
    "default_name",
    "deploy_file",
    "deploy_model",
    "rollback_route",
    "undeploy_model",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")  # as the agent checks it
_SWAP = {"keep-old": pb.SWAP_MODE_KEEP_OLD, "unload-first": pb.SWAP_MODE_UNLOAD_FIRST}
_DEFAULT_BATCH_DELAY = 0.005


@dataclass(frozen=True)
class DeployOptions:
    """What `mle deploy` was asked: a file to deploy, or a route change for a model name."""

    model: str
    target: str
    name: str | None = None
    version: int = 0
    swap: str = "keep-old"
    batch_size: int = 0
    batch_delay: float | None = None
    rollback: bool = False
    route: RouteChange = field(default_factory=RouteChange)


@dataclass(frozen=True)
class DeployOutcome:
    """What changed on the agent."""

    action: str  # deploy | route | rollback
    target: str
    model: str
    version: int  # deploy: the version; route change: the primary afterwards
    route: RouteSpec
    created: bool = False
    runtime: str = ""
    size: int = 0
    load_seconds: float = 0.0
    uploaded: int = 0
    filename: str = ""
    source_run: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {**self.__dict__, "route": self.route.to_dict()}


@dataclass(frozen=True)
class ModelFile:
    """A model file in the project's artifact store, and the run and step that made it."""

    digest: str
    size: int
    filename: str
    source_run: str = ""
    source_step: str = ""


def default_name(path: Path) -> str:
    """The model name for a file: its name up to the first dot (`model.int8.onnx` -> `model`)."""
    return path.name.split(".", 1)[0].lower()


def deploy_model(settings: Settings, options: DeployOptions) -> DeployOutcome:
    """Deploy a model file, or change the route of a deployed model; record it in the ledger.

    The target is resolved outside the event loop: a name found by mDNS browses with zeroconf's
    own threads, which refuse to close from inside a running loop (a warning on stderr)."""
    path = Path(options.model)
    if path.is_file():
        _check_file_options(options)
        name = check_model_name(options.name or default_name(path), given=bool(options.name))
        store = ArtifactStore(settings.artifacts_dir)
        model = _stored_model(settings, store, path)  # a file that cannot be read: before a target
        endpoint = resolve_target(options.target, settings)
        deploying = _deploy_file(settings, replace(options, name=name), store, model, endpoint)
        outcome, record = asyncio.run(deploying)
    else:
        _check_route_options(options)
        endpoint = resolve_target(options.target, settings)
        outcome, record = asyncio.run(_change_route(settings, options, endpoint))
    ledger = Ledger(settings.ledger_path)
    try:
        deployments.record_deployment(ledger, record)
    finally:
        ledger.close()
    return outcome


def _check_file_options(options: DeployOptions) -> None:
    if options.rollback or not replace(options.route, version=0, canary=0.0).empty:
        raise UsageError(
            "--rollback, --shadow, --policy and its options change a deployed model: "
            "give its name instead of a file"
        )
    if options.swap not in _SWAP:
        raise UsageError(f"invalid --swap {options.swap!r}: use keep-old or unload-first")
    if options.batch_delay is not None and options.batch_size <= 1:
        raise UsageError("--batch-delay needs --batch-size greater than 1")


def _check_route_options(options: DeployOptions) -> None:
    if options.name or options.batch_size or options.batch_delay is not None:
        raise UsageError("--name and --batch-* apply when deploying a model file")
    if options.rollback and not options.route.empty:
        raise UsageError("--rollback goes alone: it returns to the route before the current one")


def _stored_model(settings: Settings, store: ArtifactStore, path: Path) -> ModelFile:
    """The file in the project's store, with the run and step that made it when known."""
    try:
        digest, size = store.put_file(path)
    except OSError as e:
        raise InvalidInput(f"cannot read {path}: {e.strerror or e}") from None
    source_run, source_step = _lineage(settings, digest)
    return ModelFile(digest, size, path.name, source_run, source_step)


async def _deploy_file(
    settings: Settings,
    options: DeployOptions,
    store: ArtifactStore,
    model: ModelFile,
    endpoint: Endpoint,
) -> tuple[DeployOutcome, DeploymentRecord]:
    async with open_client(endpoint, settings.rpc_timeout) as client:
        return await deploy_file(client, endpoint, settings, store, model, options)


def check_model_name(name: str, *, given: bool = True) -> str:
    """The name, if a model may have it; UsageError otherwise."""
    if not _NAME.fullmatch(name):
        raise UsageError(
            f"invalid model name {name!r}: use lowercase letters, digits, '_', '.', '-'",
            hint="" if given else "name it with --name",
        )
    return name


async def deploy_file(
    client: ModelsClient,
    endpoint: Endpoint,
    settings: Settings,
    store: ArtifactStore,
    model: ModelFile,
    options: DeployOptions,
) -> tuple[DeployOutcome, DeploymentRecord]:
    """Ship a stored model file to the client's agent (unless it holds it) and deploy it."""
    uploaded = await _ship(endpoint, settings, model.digest, store)
    request = pb.DeployRequest(
        name=options.name or default_name(Path(model.filename)),
        version=options.version,
        digest=model.digest,
        filename=model.filename,
        swap=_SWAP[options.swap],
        batching=_batching(options),
        canary_percent=options.route.canary,
        source_run=model.source_run,
        source_step=model.source_step,
    )
    reply = await client.deploy(request)
    return _deployed(client, reply, request, model.size, uploaded)


async def rollback_route(client: ModelsClient, name: str) -> tuple[DeployOutcome, DeploymentRecord]:
    """Return a model to the route it had before the current one."""
    reply = await client.route(pb.RouteRequest(name=name, rollback=True))
    return _route_changed(client, reply, "rollback")


async def undeploy_model(client: ModelsClient, name: str) -> tuple[DeployOutcome, DeploymentRecord]:
    """Stop serving a model and remove all its versions from the agent."""
    await client.undeploy(pb.UndeployRequest(name=name))
    outcome = DeployOutcome("undeploy", client.target, name, 0, RouteSpec())
    record = DeploymentRecord(
        target=client.target,
        agent=client.agent,
        model=name,
        action="undeploy",
        operator=operator_name(),
    )
    return outcome, record


async def _ship(endpoint: Endpoint, settings: Settings, digest: str, store: ArtifactStore) -> int:
    """Send the file unless the agent holds it (dedup by digest); return the bytes sent."""
    conn = await connect(endpoint, settings.rpc_timeout)
    try:
        missing = await conn.missing([digest])
        await conn.ship(missing, store)
    finally:
        await conn.close()
    return sum(store.size(d) or 0 for d in missing)


def _batching(options: DeployOptions) -> pb.Batching | None:
    if options.batch_size <= 1:
        return None
    delay = options.batch_delay if options.batch_delay is not None else _DEFAULT_BATCH_DELAY
    return pb.Batching(max_batch_size=options.batch_size, max_queue_delay_seconds=delay)


def _deployed(
    client: ModelsClient,
    reply: pb.DeployResponse,
    request: pb.DeployRequest,
    size: int,
    uploaded: int,
) -> tuple[DeployOutcome, DeploymentRecord]:
    version = next((v for v in reply.model.versions if v.version == reply.version), None)
    route = route_from_pb(reply.model.route)
    runtime = version.runtime if version is not None else ""
    outcome = DeployOutcome(
        action="deploy",
        target=client.target,
        model=reply.model.name or request.name,
        version=reply.version,
        route=route,
        created=reply.created,
        runtime=runtime,
        size=size,
        load_seconds=reply.load_seconds,
        uploaded=uploaded,
        filename=request.filename,
        source_run=version.source_run if version is not None else request.source_run,
    )
    record = DeploymentRecord(
        target=client.target,
        agent=client.agent,
        model=outcome.model,
        action="deploy",
        operator=operator_name(),
        version=reply.version,
        digest=request.digest,
        runtime=runtime,
        filename=request.filename,
        size=size,
        uploaded=uploaded,
        route=route.to_dict(),
        created=reply.created,
        source_run=request.source_run,
        source_step=request.source_step,
    )
    return outcome, record


async def _change_route(
    settings: Settings, options: DeployOptions, endpoint: Endpoint
) -> tuple[DeployOutcome, DeploymentRecord]:
    async with open_client(endpoint, settings.rpc_timeout) as client:
        status = await _served(client, options.model)
        if not options.rollback and options.route.empty:
            raise UsageError(
                f"{status.name} is a deployed model: say what to change "
                "(--version, --canary, --shadow, --policy or --rollback)"
            )
        if options.rollback:
            return await rollback_route(client, status.name)
        route = _planned(status, options.route, client.target)
        reply = await client.route(pb.RouteRequest(name=status.name, route=route_to_pb(route)))
    return _route_changed(client, reply, "route")


def _route_changed(
    client: ModelsClient, reply: pb.ModelStatus, action: str
) -> tuple[DeployOutcome, DeploymentRecord]:
    route = route_from_pb(reply.route)
    outcome = DeployOutcome(action, client.target, reply.name, route.primary, route)
    record = DeploymentRecord(
        target=client.target,
        agent=client.agent,
        model=reply.name,
        action=action,
        operator=operator_name(),
        version=route.primary or None,
        route=route.to_dict(),
    )
    return outcome, record


def _planned(status: pb.ModelStatus, change: RouteChange, target: str) -> RouteSpec:
    versions = [v.version for v in status.versions]
    try:
        return plan_route(route_from_pb(status.route), change, versions)
    except NotFound as e:  # name the model: the planner only knows version numbers
        raise NotFound(f"{status.name} on {target}: {e}") from None


async def _served(client: ModelsClient, name: str) -> pb.ModelStatus:
    """The agent's status of a model name; NotFound names both readings of MODEL."""
    try:
        found = [m for m in await client.models(name) if m.name == name]
    except NotFound:
        found = []
    if not found:
        raise NotFound(
            f"{name} is neither a model file nor a model deployed on {client.target}",
            hint="`mle models --target " + client.target + "` lists the deployed models",
        )
    return found[0]


def _lineage(settings: Settings, digest: str) -> tuple[str, str]:
    """The run and step whose output this file is, when the ledger knows one."""
    if not settings.ledger_path.exists():
        return "", ""
    ledger = Ledger(settings.ledger_path)
    try:
        return deployments.artifact_source(ledger, digest) or ("", "")
    finally:
        ledger.close()
