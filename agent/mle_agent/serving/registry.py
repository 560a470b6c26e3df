"""ModelRegistry: the models an agent serves, their versions and routes; thread-safe.

Semantics:
- Versions are integers per model name, stored under `<data_dir>/models/<name>/<version>/` with
  the model file and `manifest.json`; the route lives in `<data_dir>/models/<name>/route.json`
  with its history (the last HISTORY_LIMIT routes, for rollback). State survives a restart:
  `start()` (or `start_background()`, which returns at once, the routed versions LOADING)
  reloads the routes and loads the versions they use (see restoring.py).
- Before this process first loads a version, its file is checked again (digest, then a load in
  a child process): a file changed on disk cannot take the agent down; that version is FAILED.
- Versions the route uses are loaded (READY); the previous primary stays loaded too (fast
  rollback) unless the model was deployed with SWAP_MODE_UNLOAD_FIRST; others are AVAILABLE.
- `infer` picks a version from an immutable snapshot of the route taken when the request starts,
  so a swap never fails an in-flight request, and the version it names was live at that moment.
- Errors are `mle_proto.errors` classes (their gRPC status is what the client sees): NotFound for
  an unknown model or version, InvalidInput for wrong input names/dtypes/shapes or a file that is
  not a model, FailedPrecondition for a runtime not installed (the message names the extra), an
  undeploy of a routed version, no route, or a version not loaded (or FAILED); AgentUnavailable
  only for a version still loading past the wait, or the agent shutting down.

Locking: one registry lock (a Condition) guards the in-memory state and is held only briefly;
a per-model admin lock serializes deploy/route/undeploy of that model, which load and unload
outside the registry lock, so requests keep flowing while a version loads. Front-ends run admin
calls in `admin`, a small pool of their own, so slow deploys never hold up inference, health or
metadata. A request takes the route snapshot and its leases on the versions it will run under
the registry lock, and unloading removes a version under the same lock before waiting for its
leases: nothing is closed under a running call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from mle_agent.serving.calls import InferRequest, InferResult, ModelMetadata
from mle_agent.serving.deploying import (
    existing_version,
    new_manifest,
    redeploy,
    swap_in,
    verify_file,
)
from mle_agent.serving.dispatch import Plan, dispatch, plan_request
from mle_agent.serving.loaded import LoadedVersion
from mle_agent.serving.policies import ShadowMirror
from mle_agent.serving.repository import (
    HISTORY_LIMIT,
    UNLOAD_FIRST,
    Manifest,
    ModelRepository,
    check_name,
)
from mle_agent.serving.restoring import restore, saved_models
from mle_agent.serving.routing import Route, validate_route
from mle_agent.serving.runtimes import PLATFORMS, load_backend, warm_up
from mle_agent.serving.state import ModelState
from mle_agent.serving.stats import VersionCounters, VersionStatsRow
from mle_proto.errors import AgentUnavailable, FailedPrecondition, NotFound
from mle_proto.v1 import agent_pb2 as pb

if TYPE_CHECKING:
    from mle_agent.settings import AgentSettings
    from mle_proto.store import ArtifactStore

__all__ = ["ADMIN_THREADS", "InferRequest", "InferResult", "ModelMetadata", "ModelRegistry"]

log = logging.getLogger(__name__)

ADMIN_THREADS = 2  # deploys, routes and undeploys running at once (each model's are serialized)


class ModelRegistry:
    """Every model the agent serves."""

    def __init__(self, settings: AgentSettings, store: ArtifactStore) -> None:
        self.settings = settings
        self.store = store
        self.repository = ModelRepository(settings.models_root)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._models: dict[str, ModelState] = {}
        self._admin: dict[str, threading.Lock] = {}
        self._pool = ThreadPoolExecutor(
            max_workers=max(4, settings.infer_workers), thread_name_prefix="mle-policy"
        )
        self._mirror = ShadowMirror()
        # Deploy/route/undeploy block for seconds: front-ends run them here, not in shared pools.
        self.admin = ThreadPoolExecutor(max_workers=ADMIN_THREADS, thread_name_prefix="mle-admin")
        self._restorer: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        """Load the routes on disk and the versions they use (blocking; call off the loop)."""
        restore(self, self._publish(saved_models(self.repository)))

    def start_background(self) -> None:
        """Publish the models on disk at once, their routed versions LOADING (so not ready),
        then check and load those versions on a background thread."""
        pending = self._publish(saved_models(self.repository))
        self._restorer = threading.Thread(
            target=restore, args=(self, pending), name="mle-restore", daemon=True
        )
        self._restorer.start()

    def deploy(self, request: pb.DeployRequest) -> pb.DeployResponse:
        """Validate, check-load in a child process, load, warm up, then switch (blocking)."""
        started = time.monotonic()
        name = check_name(request.name)
        with self.admin_lock(name):
            model = self._models.get(name) or ModelState(name)
            version = existing_version(model, request)
            if version is not None:
                redeploy(self, model, model.manifests[version], request)
                elapsed = time.monotonic() - started
                return pb.DeployResponse(
                    model=self._status(model), version=version, load_seconds=elapsed
                )
            manifest = new_manifest(self, model, request)
            self.repository.add_version(manifest, self.store.path_of(manifest.digest))
            try:
                with self._lock:  # one step: a request never sees the model without it loading
                    model.manifests[manifest.version] = manifest
                    model.checked.add(manifest.version)
                    model.loading.add(manifest.version)
                    self._models[name] = model
                swap_in(self, model, manifest, request.canary_percent)
            except BaseException:
                self._forget(model, manifest.version)
                raise
            elapsed = time.monotonic() - started
        return pb.DeployResponse(
            model=self._status(model), version=manifest.version, created=True, load_seconds=elapsed
        )

    def route(self, request: pb.RouteRequest) -> pb.ModelStatus:
        """Apply a new route (loading what it needs first) or roll back (blocking)."""
        with self.admin_lock(self._get(request.name).name):
            model = self._get(request.name)
            if request.rollback:
                route = self._previous(model)
            else:
                route = Route.from_proto(request.route)
                outputs = {v: m.outputs for v, m in model.manifests.items()}
                validate_route(model.name, route, model.manifests, outputs=outputs)
                if route == model.route:
                    return self._status(model)
            try:
                for version in sorted(route.versions - set(model.loaded)):
                    self.load(model, version)
                self.switch(model, route, rollback=request.rollback)
            finally:
                self.trim(model)
            return self._status(model)

    def undeploy(self, request: pb.UndeployRequest) -> pb.ModelStatus:
        """Remove a version or a whole model."""
        with self.admin_lock(self._get(request.name).name):
            model = self._get(request.name)
            if not request.version:
                with self._lock:
                    del self._models[model.name]
                    self._changed.notify_all()
                for version in list(model.loaded):
                    self.unload(model, version)
                self.repository.remove_model(model.name)
                return pb.ModelStatus(name=model.name)
            version = request.version
            if version not in model.manifests:
                raise NotFound(f"model {model.name} has no version {version}")
            if model.route and version in model.route.versions:
                raise FailedPrecondition(
                    f"model {model.name} version {version} is in use by the route "
                    f"({model.route.describe()}); route traffic away from it first"
                )
            self.unload(model, version)
            self._forget(model, version)
            return self._status(model)

    def status(self, name: str = "") -> list[pb.ModelStatus]:
        """Models (one, or all when name is empty) with versions, route and stats."""
        with self._lock:
            models = [self._get(name)] if name else [self._models[n] for n in sorted(self._models)]
            return [self._status(model) for model in models]

    def infer(self, request: InferRequest) -> InferResult:
        """Route, validate inputs, run (batched where configured), record stats (blocking)."""
        if self._closed:
            raise AgentUnavailable("the agent is shutting down")
        model = self._get(request.model)
        plan = self._plan(model, request)
        try:
            version, outputs, parameters = dispatch(plan, request, self._pool, self._mirror)
        finally:
            plan.release()
        return InferResult(model.name, version, outputs, parameters)

    def metadata(self, name: str, version: int | None = None) -> ModelMetadata:
        """Metadata of a model (its primary version) or of one version."""
        with self._lock:
            model = self._get(name)
            if version is None:
                version = model.route.primary if model.route else max(model.manifests)
            manifest = self._manifest(model, version)
            return ModelMetadata(
                name=model.name,
                versions=tuple(sorted(model.manifests)),
                platform=PLATFORMS.get(manifest.runtime, manifest.runtime),
                inputs=manifest.inputs,
                outputs=manifest.outputs,
            )

    def ready(self, name: str = "", version: int | None = None) -> bool:
        """Server readiness (every routed version loaded) or one model's / version's."""
        with self._lock:
            if not name:
                return not self._closed and all(m.routed_ready() for m in self._models.values())
            model = self._get(name)
            if version is None:
                return model.routed_ready()
            self._manifest(model, version)
            return version in model.loaded

    def close(self) -> None:
        """Stop restoring and admin calls, then batchers; release every backend."""
        self._closed = True
        if self._restorer is not None:
            self._restorer.join()  # it stops after the version it is checking or loading
        self.admin.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            models = list(self._models.values())
        # Unloading waits for running requests, whose leases the pool (late fallback primaries)
        # and the shadow thread may hold: both stop only after.
        for model in models:
            for version in list(model.loaded):
                self.unload(model, version)
        self._pool.shutdown(wait=True)
        self._mirror.close()

    def version_stats(self) -> list[VersionStatsRow]:
        """Every version's counters (those ever loaded since the agent started)."""
        with self._lock:
            return [
                VersionStatsRow(model.name, version, version in model.loaded, counters.snapshot())
                for model in sorted(self._models.values(), key=lambda m: m.name)
                for version, counters in sorted(model.counters.items())
            ]

    # ---- used by deploying.py and restoring.py, under the model's admin lock ----

    def load(self, model: ModelState, version: int) -> LoadedVersion:
        """Load and warm up a version in this process, its file checked first if this process
        has not checked it yet; FAILED (and raise) when it cannot."""
        manifest = model.manifests[version]
        with self._lock:
            model.loading.add(version)
            model.failed.pop(version, None)
            checked = version in model.checked
        try:
            path = self.repository.model_path(manifest)
            if not checked:
                verify_file(self, manifest, path)
            backend = load_backend(path, manifest.runtime, self.settings.serve_threads)
            try:
                warm_up(backend)
            except BaseException:
                backend.close()
                raise
        except Exception as exc:
            with self._lock:
                model.loading.discard(version)
                model.failed[version] = str(exc)
                self._changed.notify_all()
            raise
        with self._lock:
            counters = model.counters.setdefault(version, VersionCounters())
            loaded = LoadedVersion(manifest, backend, counters)
            model.checked.add(version)
            model.loaded[version] = loaded
            model.loading.discard(version)
            self._changed.notify_all()
        return loaded

    def unload(self, model: ModelState, version: int) -> None:
        """Take a version out of service, then close it once its running requests finish."""
        with self._lock:
            loaded = model.loaded.pop(version, None)
        if loaded is not None:
            loaded.close()

    def switch(self, model: ModelState, route: Route, *, rollback: bool = False) -> None:
        """Make `route` current: on disk first, then in memory in one step."""
        history = list(model.history)
        if rollback:
            history.pop()
        elif model.route is not None:
            history.append(model.route)
        history = history[-HISTORY_LIMIT:]  # as on disk: a rollback must not outlive a restart
        self.repository.write_route(model.name, route, history)
        with self._lock:
            model.route, model.history = route, history
            self._changed.notify_all()

    def trim(self, model: ModelState) -> None:
        """Unload what the route no longer needs; the previous primary stays unless unload-first."""
        keep = set(model.route.versions) if model.route else set()
        previous = model.history[-1].primary if model.history else 0
        primary = model.manifests.get(model.route.primary) if model.route else None
        if previous and (primary is None or primary.swap != UNLOAD_FIRST):
            keep.add(previous)
        for version in sorted(set(model.loaded) - keep):
            self.unload(model, version)

    def settle(self, model: ModelState, reason: str, keep: Collection[int] = ()) -> None:
        """Versions marked LOADING that will not load after all: FAILED with `reason`, or (no
        reason) AVAILABLE; those in `keep` stay LOADING."""
        with self._lock:
            for version in model.loading - set(keep):
                model.loading.discard(version)
                if reason:
                    model.failed[version] = reason
            self._changed.notify_all()

    def admin_lock(self, name: str) -> threading.Lock:
        """The lock serializing changes to one model; AgentUnavailable once closing."""
        with self._lock:
            if self._closed:
                raise AgentUnavailable("the agent is shutting down")
            return self._admin.setdefault(name, threading.Lock())

    def serves(self, model: ModelState) -> bool:
        """Whether `model` is still the one served under its name (not undeployed meanwhile)."""
        with self._lock:
            return self._models.get(model.name) is model

    @property
    def closed(self) -> bool:
        """Whether the registry is closing: long admin work stops early."""
        return self._closed

    def set_swapping(self, model: ModelState, swapping: bool) -> None:
        """Mark an unload-first swap as under way (requests wait) or over."""
        with self._lock:
            model.swapping = swapping
            self._changed.notify_all()

    # ---- private ----

    def _publish(self, models: list[ModelState]) -> list[ModelState]:
        """Serve these models (read from disk), what their routes use marked LOADING."""
        with self._lock:
            for model in models:
                model.loading.update(model.route.versions if model.route else ())
                self._models[model.name] = model
            self._changed.notify_all()
        return models

    def _plan(self, model: ModelState, request: InferRequest) -> Plan:
        """The versions this request runs, leased; waits while a version it needs is loading."""
        deadline = time.monotonic() + self.settings.load_wait
        with self._changed:
            while True:
                if self._models.get(model.name) is not model:
                    raise NotFound(f"model {model.name} is not deployed on this agent")
                plan = plan_request(model, request)
                if plan is not None:
                    return plan
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentUnavailable(
                        f"model {model.name} is still loading after "
                        f"{self.settings.load_wait:g}s; try again"
                    )
                self._changed.wait(remaining)

    def _previous(self, model: ModelState) -> Route:
        if not model.history:
            raise FailedPrecondition(f"model {model.name} has no previous route to roll back to")
        route = model.history[-1]
        missing = sorted(route.versions - set(model.manifests))
        if missing:
            raise FailedPrecondition(
                f"cannot roll back model {model.name}: version {missing[0]} was undeployed"
            )
        return route

    def _forget(self, model: ModelState, version: int) -> None:
        """Drop a version from memory and disk; the model too when it was its only version."""
        with self._lock:
            model.manifests.pop(version, None)
            model.counters.pop(version, None)
            model.failed.pop(version, None)
            model.loading.discard(version)
            model.checked.discard(version)
            if not model.manifests:
                self._models.pop(model.name, None)
        if model.manifests:
            self.repository.remove_version(model.name, version)
        else:
            self.repository.remove_model(model.name)

    def _get(self, name: str) -> ModelState:
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise NotFound(f"model {name[:80]!r} is not deployed on this agent")
        return model

    def _manifest(self, model: ModelState, version: int) -> Manifest:
        manifest = model.manifests.get(version)
        if manifest is None:
            raise NotFound(f"model {model.name} has no version {version}")
        return manifest

    def _status(self, model: ModelState) -> pb.ModelStatus:
        with self._lock:
            return model.status()
