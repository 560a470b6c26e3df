"""Where steps run: target names resolved to agent endpoints.

A target is the embedded `local` agent, an entry of the inventory (`targets/*.yaml`), or an agent
found by mDNS (cached in the ledger); `fleet` merges them by name, the inventory winning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint, TlsIdentity
from mle_cli.targets.local import LOCAL, ensure_local_agent, local_agent_endpoint, stop_local_agent
from mle_proto.errors import NotFound

if TYPE_CHECKING:
    from mle_cli.targets.fleet import Target

__all__ = [
    "LOCAL",
    "Endpoint",
    "TlsIdentity",
    "ensure_local_agent",
    "known_targets",
    "local_agent_endpoint",
    "resolve_target",
    "stop_local_agent",
]


def known_targets(settings: Settings) -> list[str]:
    """Names a step can be placed on: local, the inventory and the agents mDNS has seen."""
    from mle_cli.targets.fleet import fleet_targets

    return [target.name for target in fleet_targets(settings)]


def resolve_target(name: str, settings: Settings, *, start: bool = True) -> Endpoint:
    """The endpoint of a target, starting the local agent when needed and `start` is set.

    Another target is looked up in the fleet. With `start`, when the cache cannot place it
    (unknown, gone, or no address), one bounded mDNS browse refreshes the cache before it is
    refused; without, nothing but files is read (listings resolve many names).
    """
    from mle_cli.targets.fleet import fleet_targets, target_endpoint

    if name == LOCAL:
        if start:
            return ensure_local_agent(settings)
        endpoint = local_agent_endpoint(settings)
        if endpoint is None:
            raise NotFound("the local agent is not running")
        return endpoint
    targets = fleet_targets(settings)
    target = _named(targets, name)
    if start and (target is None or not target.placeable):
        targets = fleet_targets(settings, browse=True)  # the cache may just be stale
        target = _named(targets, name)
    if target is None:
        known = ", ".join(t.name for t in targets)
        raise NotFound(f"unknown target {name!r}; known targets: {known}")
    return target_endpoint(target, settings)


def _named(targets: list[Target], name: str) -> Target | None:
    return next((target for target in targets if target.name == name), None)
