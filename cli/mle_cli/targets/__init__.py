"""Where steps run: target names resolved to agent endpoints.

This version knows the embedded `local` agent; the inventory (`targets/*.yaml`) and mDNS
discovery extend `resolve_target` without changing its callers.
"""

from __future__ import annotations

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint
from mle_cli.targets.local import LOCAL, ensure_local_agent, local_agent_endpoint, stop_local_agent
from mle_proto.errors import NotFound

__all__ = [
    "LOCAL",
    "Endpoint",
    "ensure_local_agent",
    "known_targets",
    "local_agent_endpoint",
    "resolve_target",
    "stop_local_agent",
]


def known_targets(settings: Settings) -> list[str]:
    """Names a step can be placed on."""
    from mle_cli.targets.fleet import fleet_targets

    return [target.name for target in fleet_targets(settings)]


def resolve_target(name: str, settings: Settings, *, start: bool = True) -> Endpoint:
    """The endpoint of a target, starting the local agent when needed and `start` is set."""
    if name == LOCAL:
        if start:
            return ensure_local_agent(settings)
        endpoint = local_agent_endpoint(settings)
        if endpoint is None:
            raise NotFound("the local agent is not running")
        return endpoint
    raise NotFound(f"unknown target {name!r}; known targets: {', '.join(known_targets(settings))}")
