"""Deploying a model version: from a digest in the store to a manifest, then into service.

Every check runs before anything changes: the file is in the store, its format is known, its
runtime is installed, its digest matches, it loads and warms up in a child process (so a file
that crashes the runtime cannot take the agent down), and its signature equals the serving
version's. Only then is the version written, loaded in-process and switched to. A failure at
any step leaves the serving version untouched.

A deploy is idempotent on (name, digest, batching): the same file with the same batching again
is its existing version (created = false), which is then routed as the request asks (all
traffic, or a canary share against the current primary) unless it already serves that way, or
loaded again if it is not loaded (after a crash mid-deploy, a version may be on disk without a
route). The same file with other batching becomes a new version: versions never change, so a
rollback also brings the old batching back.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from mle_agent.serving.repository import KEEP_OLD, UNLOAD_FIRST, Manifest
from mle_agent.serving.routing import Route
from mle_agent.serving.runtimes import available_runtimes, detect_runtime, not_installed
from mle_agent.serving.validation import LoadCheck, check_digest, check_load, check_signature
from mle_proto import MAX_UINT32
from mle_proto.errors import AlreadyExists, FailedPrecondition, InvalidInput, MleError, NotFound
from mle_proto.store import parse_digest
from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from pathlib import Path

    from mle_agent.serving.registry import ModelRegistry
    from mle_agent.serving.state import ModelState

__all__ = [
    "existing_version",
    "new_manifest",
    "planned_route",
    "redeploy",
    "swap_in",
    "verify_file",
]


def existing_version(model: ModelState, request: pb.DeployRequest) -> int | None:
    """The version this file is already deployed as, with the same batching, else None."""
    batching = _batching(request.batching.max_batch_size, request.batching.max_queue_delay_seconds)
    if request.version:
        found = model.manifests.get(request.version)
        if found is None:
            return None
        if found.digest != request.digest:
            raise AlreadyExists(
                f"model {model.name} version {request.version} already exists with another "
                f"file ({found.filename or found.digest}); leave out the version to add a new one"
            )
        if _batching(found.max_batch_size, found.max_queue_delay) != batching:
            raise AlreadyExists(
                f"model {model.name} version {request.version} already exists with other "
                "batching; leave out the version to deploy the file again as a new one"
            )
        return found.version
    same = [
        m.version
        for m in model.manifests.values()
        if m.digest == request.digest and _batching(m.max_batch_size, m.max_queue_delay) == batching
    ]
    return same[0] if same else None


def redeploy(
    registry: ModelRegistry, model: ModelState, manifest: Manifest, request: pb.DeployRequest
) -> None:
    """Serve an existing version as the request asks; nothing when it already does."""
    _check_options(model.name, request)
    route = planned_route(model, manifest.version, request.canary_percent)
    serving = model.route is not None and model.route.split == route.split
    if serving and route.versions <= set(model.loaded):
        return
    swap = UNLOAD_FIRST if request.swap == pb.SWAP_MODE_UNLOAD_FIRST else KEEP_OLD
    swap_in(registry, model, manifest, request.canary_percent, swap=swap)


def planned_route(model: ModelState, version: int, canary: float) -> Route:
    """The route a deploy of `version` asks for: a canary against the current primary, else all
    traffic (a canary of the primary itself is all traffic: it already has the most)."""
    current = model.route.primary if model.route else 0
    if current and current != version and 0 < canary < 100:
        return Route.canary(version, current, canary)
    return Route.single(version)


def verify_file(registry: ModelRegistry, manifest: Manifest, path: Path) -> None:
    """Check a stored version's file before this process loads it: digest, then a child load."""
    with _naming(path, manifest.filename or f"the file of version {manifest.version}"):
        check_digest(path, manifest.digest)
        _check_load(registry, path, manifest.runtime)


def new_manifest(registry: ModelRegistry, model: ModelState, request: pb.DeployRequest) -> Manifest:
    """Check the file and the request; the manifest of the version to create."""
    _check_options(model.name, request)
    version = request.version or _next_version(model)
    path = _stored(registry, request)
    label = request.filename or request.digest
    with _naming(path, label):
        runtime = detect_runtime(path)
        if runtime not in available_runtimes():
            raise FailedPrecondition(not_installed(runtime))
        check_digest(path, request.digest)
        check = _check_load(registry, path, runtime)
    primary = model.manifests.get(model.route.primary) if model.route else None
    if primary is not None:
        current = (primary.inputs, primary.outputs)
        check_signature(model.name, (check.inputs, check.outputs), current, primary.version)
    if request.batching.max_batch_size > 1:
        _check_batchable(model.name, check)
    return Manifest(
        name=model.name,
        version=version,
        digest=request.digest,
        runtime=runtime,
        filename=request.filename,
        size=path.stat().st_size,
        created=time.time(),
        inputs=check.inputs,
        outputs=check.outputs,
        source_run=request.source_run,
        source_step=request.source_step,
        max_batch_size=request.batching.max_batch_size,
        max_queue_delay=request.batching.max_queue_delay_seconds,
        swap=UNLOAD_FIRST if request.swap == pb.SWAP_MODE_UNLOAD_FIRST else KEEP_OLD,
    )


def _next_version(model: ModelState) -> int:
    """One above the highest version; versions travel as uint32, so there may be none."""
    version = max(model.manifests, default=0) + 1
    if version > MAX_UINT32:
        raise FailedPrecondition(
            f"model {model.name}: version {MAX_UINT32} is the highest there can be; deploy with "
            "--version N for a free N, or undeploy that version first"
        )
    return version


def swap_in(
    registry: ModelRegistry,
    model: ModelState,
    manifest: Manifest,
    canary: float,
    *,
    swap: str = "",
) -> None:
    """Load the version unless loaded, and route traffic to it (all, or a canary share); the
    swap mode is the manifest's unless `swap` names another."""
    route = planned_route(model, manifest.version, canary)
    if (swap or manifest.swap) == UNLOAD_FIRST and model.route is not None:
        _unload_first(registry, model, manifest.version, route)
    else:
        loaded_here = _ensure_loaded(registry, model, manifest.version)
        try:
            registry.switch(model, route)
        except BaseException:
            if loaded_here:
                registry.unload(model, manifest.version)
            raise
    registry.trim(model)


def _ensure_loaded(registry: ModelRegistry, model: ModelState, version: int) -> bool:
    """Load a version unless it is; whether it was loaded here."""
    if version in model.loaded:
        return False
    registry.load(model, version)
    return True


def _unload_first(registry: ModelRegistry, model: ModelState, version: int, route: Route) -> None:
    """Free the memory of what the new route does not use, then load: requests wait meanwhile."""
    registry.set_swapping(model, True)
    try:
        for old in sorted(set(model.loaded) - route.versions):
            registry.unload(model, old)
        loaded_here = False
        try:
            loaded_here = _ensure_loaded(registry, model, version)
            registry.switch(model, route)
        except BaseException:
            if loaded_here:
                registry.unload(model, version)
            _reload_route(registry, model)
            raise
    finally:
        registry.set_swapping(model, False)


def _reload_route(registry: ModelRegistry, model: ModelState) -> None:
    """Bring the current route's versions back after a failed unload-first swap."""
    for version in sorted(model.route.versions if model.route else ()):
        if version not in model.loaded:
            with contextlib.suppress(Exception):  # its state says FAILED and why
                registry.load(model, version)


def _check_options(name: str, request: pb.DeployRequest) -> None:
    parse_digest(request.digest)
    if not 0 <= request.canary_percent <= 100:
        raise InvalidInput(f"model {name}: canary percent must be between 0 and 100")
    delay = request.batching.max_queue_delay_seconds
    if not math.isfinite(delay) or not 0 <= delay <= 60:
        raise InvalidInput(f"model {name}: max queue delay must be between 0 and 60 seconds")


def _check_load(registry: ModelRegistry, path: Path, runtime: str) -> LoadCheck:
    settings = registry.settings
    settings.models_root.mkdir(parents=True, exist_ok=True)  # the child's working directory
    return check_load(
        path,
        runtime,
        timeout=settings.load_check_timeout,
        threads=settings.serve_threads,
        cwd=settings.models_root,
    )


def _batching(size: int, delay: float) -> tuple[int, float]:
    """Batching as it behaves: sizes 0 and 1 are both no batching, whatever the delay."""
    return (size, delay) if size > 1 else (0, 0.0)


def _stored(registry: ModelRegistry, request: pb.DeployRequest) -> Path:
    if not registry.store.has(request.digest):
        what = f"{request.filename} ({request.digest})" if request.filename else request.digest
        raise NotFound(f"model file {what} is not on this agent: upload it first")
    return registry.store.path_of(request.digest)


def _check_batchable(name: str, check: LoadCheck) -> None:
    for kind, specs in (("input", check.inputs), ("output", check.outputs)):
        for spec in specs:
            if not spec.batched:
                shape = list(spec.shape)
                raise InvalidInput(
                    f"model {name}: batching needs a dynamic first dimension; "
                    f"{kind} {spec.name!r} has shape {shape}"
                )


@contextlib.contextmanager
def _naming(path: Path, label: str) -> Iterator[None]:
    """Errors about the stored file name the file as the operator knows it."""
    try:
        yield
    except MleError as exc:
        message = exc.message.replace(str(path), label).replace(path.name, label)
        raise type(exc)(message, hint=exc.hint) from None
