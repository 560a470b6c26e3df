"""The fleet as the operator sees it: the local agent, the inventory (`targets/*.yaml`) and the
agents found by mDNS (cached in the ledger), merged by name; an inventory entry wins.

Merge rules for a name both in the inventory and in the mDNS cache: the inventory's host and port
win when written, labels are merged with the inventory's keys winning, and the fingerprint, facts
and last-seen time come from mDNS. Any host on the LAN can announce any name, so for an entry with
a host the record counts only when it was announced from that very IP address (nothing is
resolved): otherwise it is ignored for that entry, which stays as the inventory alone describes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import TYPE_CHECKING, Any

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint
from mle_proto.errors import MleError, NotFound

if TYPE_CHECKING:
    from mle_cli.targets.connection import AgentConnection
    from mle_cli.targets.inventory import InventoryEntry

__all__ = [
    "SOURCES",
    "STATES",
    "AgentFacts",
    "Fleet",
    "Target",
    "fleet_targets",
    "fleet_view",
    "merge_targets",
    "probe_targets",
    "target_endpoint",
]

SOURCES = ("local", "inventory", "mdns", "inventory+mdns")
# unknown: in the inventory, and never seen on mDNS or silent there (its host is dialled to know)
STATES = ("up", "gone", "unknown")

PROBE_TIMEOUT = 3.0  # seconds `mle agents` waits for an agent's facts (at most rpc_timeout)
HEARTBEAT_WAIT = 1.0  # of which, seconds for its first heartbeat (the load) after GetInfo

log = logging.getLogger(__name__)


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
    first_seen: float = 0.0
    arch: str = ""  # facts from its mDNS record ("" when never seen)
    os: str = ""
    runtimes: tuple[str, ...] = ()
    version: str = ""
    inventory: InventoryEntry | None = None  # its inventory entry, when it has one

    @property
    def placeable(self) -> bool:
        """Whether a step may be sent there: local (started on demand), or an address not gone."""
        return self.source == "local" or (bool(self.address) and self.state != "gone")


@dataclass(frozen=True)
class Fleet:
    """Every target, and a warning to show when mDNS could not be browsed."""

    targets: list[Target]
    warning: str = ""


def fleet_targets(settings: Settings, *, browse: bool = False) -> list[Target]:
    """Every target by name: local first, then the inventory and the mDNS cache merged.
    With `browse`, a bounded mDNS browse refreshes the cache first."""
    return fleet_view(settings, browse=browse).targets


def fleet_view(settings: Settings, *, browse: bool = False) -> Fleet:
    """The fleet, after a bounded browse when `browse` (and mDNS browsing is not turned off)."""
    from mle_cli.targets.discovery import Browse, cached_agents, discover_agents
    from mle_cli.targets.inventory import load_inventory

    inventory = load_inventory(settings.project_dir)  # first: a bad file fails before any browse
    browsed = Browse()
    if browse and settings.mdns_browse_seconds > 0:
        browsed = discover_agents(settings.mdns_browse_seconds, settings.mdns_interfaces)
    merged = merge_targets(inventory, cached_agents(settings, browsed.agents))
    return Fleet([_local_target(settings), *merged], browsed.warning)


def merge_targets(
    inventory: Iterable[InventoryEntry], discovered: Iterable[Mapping[str, Any]]
) -> list[Target]:
    """Inventory entries and cached mDNS rows (`ledger.agents.discovered_agents`) by name."""
    from mle_cli.targets.local import LOCAL

    entries = {entry.name: entry for entry in inventory}
    seen: dict[str, Mapping[str, Any]] = {}
    for row in discovered:
        if row["name"] == LOCAL:  # reserved for the embedded agent, which is never announced
            log.debug("ignoring an mDNS record that calls itself %r", LOCAL)
        else:
            seen[row["name"]] = row
    return [
        _from_inventory(entries[name], seen.get(name))
        if name in entries
        else _from_mdns(seen[name])
        for name in sorted(entries.keys() | seen.keys())
    ]


def target_endpoint(target: Target, settings: Settings) -> Endpoint:
    """How to call a target that is not `local`: its address over mutual TLS, with the
    fingerprint its mDNS record announced; NotFound when it has no address or is gone."""
    from mle_cli.targets import pki

    if (why := _unreachable(target)) is not None:
        raise NotFound(why)
    return Endpoint(
        name=target.name,
        address=target.address,
        tls=pki.operator_identity(settings),
        fingerprint=target.fingerprint,
    )


def _unreachable(target: Target) -> str | None:
    """Why a target cannot be dialled (no address, or gone), else None."""
    if not target.address:
        where = f" ({target.inventory.where})" if target.inventory else ""
        return (
            f"target {target.name!r}{where} has no host and mDNS has not seen it; "
            "write its host: in the inventory, or start its agent with --announce"
        )
    if target.state == "gone":
        return (
            f"target {target.name!r} is gone: last seen on mDNS at {target.address} "
            f"{_ago(target.last_seen)}"
        )
    return None


def _local_target(settings: Settings) -> Target:
    from mle_cli.targets.local import LOCAL, local_agent_endpoint

    endpoint = local_agent_endpoint(settings)
    return Target(LOCAL, endpoint.address if endpoint else "")


def _from_mdns(row: Mapping[str, Any]) -> Target:
    from mle_cli.targets.inventory import join_address

    return Target(
        name=row["name"],
        address=join_address(row["address"], row["port"]),
        labels=dict(row["labels"]),
        source="mdns",
        state=row["state"],
        **_mdns_facts(row),
    )


def _from_inventory(entry: InventoryEntry, row: Mapping[str, Any] | None) -> Target:
    from mle_cli.targets.inventory import DEFAULT_AGENT_PORT, join_address

    if row is not None and entry.host and not _same_ip(entry.host, row["address"]):
        # A record naming this entry but sent from elsewhere could add labels (drawing steps to
        # the entry) or pin a fingerprint (refusing the real machine): it has no say here.
        log.debug(
            "ignoring the mDNS record of %s from %s: the inventory says %s",
            entry.name, row["address"], entry.host,
        )  # fmt: skip
        row = None
    if row is None:
        return _inventory_only(entry)
    host = entry.host or row["address"]
    port = entry.port or row["port"] or DEFAULT_AGENT_PORT  # what it announced beats a default
    state = row["state"]
    if state == "gone" and entry.host:
        state = "unknown"  # silent on mDNS, but the inventory says where to dial it
    return Target(
        name=entry.name,
        address=join_address(host, port),
        labels={**row["labels"], **entry.labels},
        source="inventory+mdns",
        state=state,
        inventory=entry,
        **_mdns_facts(row),
    )


def _inventory_only(entry: InventoryEntry) -> Target:
    """The target as its inventory entry alone describes it."""
    # Not seen on mDNS (from its host): with a host it may well be up (it is dialled to find
    # out), so its state is unknown, not gone; without a host nobody knows where it is.
    return Target(
        name=entry.name,
        address=entry.address,
        labels=dict(entry.labels),
        source="inventory",
        state="unknown",
        inventory=entry,
    )


def _same_ip(host: str, address: str) -> bool:
    """Whether the inventory's host is the IP address a record came from (names never are)."""
    try:
        return ip_address(host.split("%")[0]) == ip_address(address.split("%")[0])
    except ValueError:
        return False


def _mdns_facts(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "fingerprint": row.get("fingerprint", ""),
        "last_seen": row.get("last_seen", 0.0),
        "first_seen": row.get("first_seen", 0.0),
        "arch": row.get("arch", ""),
        "os": row.get("os", ""),
        "runtimes": tuple(row.get("runtimes", ())),
        "version": row.get("version", ""),
    }


def _ago(timestamp: float) -> str:
    if not timestamp:
        return "(never)"
    seconds = max(0.0, time.time() - timestamp)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


@dataclass(frozen=True)
class AgentFacts:
    """What an agent said about itself just now (GetInfo, then one heartbeat), or why it did not."""

    answered: bool
    note: str = ""  # why it did not answer, or why it was not asked
    at: float = 0.0
    arch: str = ""
    os: str = ""
    python: str = ""
    version: str = ""
    runtimes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    cpus: int = 0
    memory_bytes: int = 0
    disk_free_bytes: int = 0
    running_tasks: int = 0
    slots: int = 0
    load1: float | None = None  # from its first heartbeat, when one came in time
    memory_used_bytes: int | None = None

    def row(self, fleet_labels: Mapping[str, str]) -> dict[str, Any]:
        """The fields of an `mle agents` row these facts set (the fleet's labels win)."""
        if not self.answered:
            return {"note": self.note}
        return {
            "state": "up",
            "last_seen": self.at,
            "answered": True,
            "note": self.note,
            "arch": self.arch,
            "os": self.os,
            "python": self.python,
            "version": self.version,
            "runtimes": list(self.runtimes),
            "labels": {**self.labels, **fleet_labels},
            "cpus": self.cpus,
            "memory_bytes": self.memory_bytes,
            "memory_used_bytes": self.memory_used_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "load1": self.load1,
            "running_tasks": self.running_tasks,
            "slots": self.slots,
        }


def probe_targets(targets: Iterable[Target], settings: Settings) -> dict[str, AgentFacts]:
    """Ask every target that may be up for its facts, all at once, each bounded in time."""
    asked, facts = [], {}
    for target in targets:
        if target.state == "gone":
            continue  # its row says so already
        endpoint = _probe_endpoint(target, settings)
        if isinstance(endpoint, str):
            facts[target.name] = AgentFacts(answered=False, note=endpoint)
        else:
            asked.append(endpoint)
    if asked:
        timeout = min(settings.rpc_timeout, PROBE_TIMEOUT)
        beat = settings.heartbeat_interval
        answers = asyncio.run(_probe_all(asked, timeout, beat))
        facts.update(zip((e.name for e in asked), answers, strict=True))
    return facts


def _probe_endpoint(target: Target, settings: Settings) -> Endpoint | str:
    """The endpoint to ask a target on, or why it is not asked."""
    from mle_cli.targets.local import LOCAL, local_agent_endpoint

    if target.name == LOCAL:
        return local_agent_endpoint(settings) or "not running"
    if (why := _unreachable(target)) is not None:
        return why
    # Listing agents must not create a CA as a side effect: without one no agent can hold a
    # certificate this project trusts, so there is nobody to ask over mutual TLS.
    from mle_cli.targets.pki import pki_dir

    if not (pki_dir(settings) / "ca.crt").is_file():
        return "not asked: this project has no CA yet (.mle/pki), so no mutual TLS"
    try:
        return target_endpoint(target, settings)
    except MleError as exc:
        return str(exc)


async def _probe_all(endpoints: list[Endpoint], timeout: float, beat: float) -> list[AgentFacts]:
    return list(await asyncio.gather(*(_probe(e, timeout, beat) for e in endpoints)))


async def _probe(endpoint: Endpoint, timeout: float, beat: float) -> AgentFacts:
    try:
        return await asyncio.wait_for(_ask(endpoint, timeout, beat), timeout)
    except MleError as exc:
        return AgentFacts(answered=False, note=str(exc))
    except TimeoutError:
        return AgentFacts(answered=False, note=f"no answer within {timeout:g}s")


async def _ask(endpoint: Endpoint, timeout: float, beat: float) -> AgentFacts:
    from mle_cli.targets.connection import connect

    conn = await connect(endpoint, timeout, heartbeat_interval=beat)
    try:
        info = await conn.info()
        with contextlib.suppress(TimeoutError):  # the facts are worth having without the load
            await asyncio.wait_for(_first_heartbeat(conn), HEARTBEAT_WAIT)
    finally:
        await conn.close()
    heartbeat = conn.last_heartbeat
    return AgentFacts(
        answered=True,
        at=time.time(),
        arch=info.arch,
        os=info.os,
        python=info.python,
        version=info.agent_version,
        runtimes=tuple(info.runtimes),
        labels=dict(info.labels),
        cpus=info.cpus,
        memory_bytes=info.memory_bytes,
        disk_free_bytes=info.disk_free_bytes,
        running_tasks=info.running_tasks,
        slots=info.slots,
        load1=heartbeat.load1 if heartbeat else None,
        memory_used_bytes=heartbeat.memory_used_bytes if heartbeat else None,
    )


async def _first_heartbeat(conn: AgentConnection) -> None:
    while conn.last_heartbeat is None:
        await asyncio.sleep(0.01)
