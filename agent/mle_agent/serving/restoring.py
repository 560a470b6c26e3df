"""Bringing back, after an agent restart, the models on disk and the versions their routes use.

The agent listens first: `saved_models` only reads manifests and routes, the registry publishes
them with their routed versions LOADING (requests wait for them, ServerReady is false), and
`restore` then loads each version through `registry.load`, which checks the file again first
(digest, then a load in a child process). A version that fails is FAILED with its reason; the
agent stays up and serves the others. `restore` runs on a background thread in the daemon.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from mle_agent.serving.repository import HISTORY_LIMIT
from mle_agent.serving.state import ModelState
from mle_proto.errors import AgentUnavailable, MleError

if TYPE_CHECKING:
    from mle_agent.serving.registry import ModelRegistry
    from mle_agent.serving.repository import ModelRepository

__all__ = ["restore", "saved_models"]

log = logging.getLogger(__name__)


def saved_models(repository: ModelRepository) -> list[ModelState]:
    """The models on disk with their versions, route and history; nothing loaded."""
    found = []
    for name in repository.names():
        repository.clean(name)
        manifests = repository.manifests(name)
        if not manifests:
            continue
        route, history = repository.read_route(name)
        if route is not None and not route.versions <= set(manifests):
            log.warning("model %s: route %s names missing versions; ignored", name, route)
            route = None
        found.append(ModelState(name, manifests, route, history[-HISTORY_LIMIT:]))
    return found


def restore(registry: ModelRegistry, models: list[ModelState]) -> None:
    """Load what each model's route uses now; failures leave versions FAILED, never raise."""
    for model in models:
        try:
            with registry.admin_lock(model.name):
                _restore_model(registry, model)
        except AgentUnavailable:  # the registry is closing
            registry.settle(model, "")
        except Exception:
            log.exception("restoring model %s failed", model.name)
            registry.settle(model, "internal error while restoring: see the agent log")


def _restore_model(registry: ModelRegistry, model: ModelState) -> None:
    if not registry.serves(model):  # undeployed before its turn came
        return
    # A route call may have changed the route since it was read: load what it uses now.
    needed = sorted(model.route.versions - set(model.loaded) if model.route else ())
    registry.settle(model, "", keep=needed)
    for version in needed:
        if registry.closed:
            registry.settle(model, "")
            return
        try:
            registry.load(model, version)
        except MleError as exc:
            log.warning("model %s version %d failed to load: %s", model.name, version, exc)
