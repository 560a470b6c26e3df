"""mDNS discovery of agents: a bounded browse for `_mle-agent._tcp.local.` and `mle agents`.

Records are hostile until validated: a malformed one (wrong proto, missing fields, huge TXT,
non-UTF-8, control characters, a name or label no selector could state) is ignored with a debug
log line and never stops the browse. Found agents are cached in the ledger, so a listing also
shows those not heard this time (as "gone" once unseen for `agent_gone_after` seconds, forgotten
after `agent_forget_after`). `mle agents` lists the whole fleet (the inventory too, see `fleet`)
with each agent's live facts. zeroconf is imported lazily.
"""

from __future__ import annotations

import logging
import queue
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING, Any

import psutil

from mle_cli.settings import Settings
from mle_cli.targets.selectors import LABEL_KEY, LABEL_VALUE, NAME
from mle_proto import PROTO_VERSION

if TYPE_CHECKING:
    from zeroconf import ServiceInfo, Zeroconf

    from mle_cli.targets.fleet import AgentFacts, Target

__all__ = [
    "SERVICE_TYPE",
    "AgentListing",
    "Browse",
    "DiscoveredAgent",
    "RecordError",
    "cached_agents",
    "discover_agents",
    "list_agents",
    "parse_record",
]

SERVICE_TYPE = "_mle-agent._tcp.local."
TXT_MAX_BYTES = 1024  # a real record is well under this (labels and name are each <= 255)
_RESOLVE_WAIT = 0.5  # seconds one unanswered record may hold the browse loop
_RUNTIME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_RUNTIMES = 16
_LIVE_NUMBERS = (
    "cpus", "memory_bytes", "memory_used_bytes", "disk_free_bytes",
    "load1", "running_tasks", "slots",
)  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveredAgent:
    """An agent as its mDNS record describes it."""

    name: str
    address: str
    port: int
    arch: str = ""
    os: str = ""
    runtimes: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    fingerprint: str = ""
    version: str = ""
    last_seen: float = 0.0

    @property
    def endpoint(self) -> str:
        """`host:port` (IPv6 in brackets) to connect to."""
        return (
            f"[{self.address}]:{self.port}"
            if ":" in self.address
            else f"{self.address}:{self.port}"
        )


@dataclass(frozen=True)
class Browse:
    """What one bounded browse found; `warning` says why mDNS could not be used."""

    agents: tuple[DiscoveredAgent, ...] = ()
    ignored: int = 0
    warning: str = ""


@dataclass(frozen=True)
class AgentListing:
    """The rows of `mle agents` and a warning to show (mDNS unavailable)."""

    rows: list[dict[str, Any]]
    warning: str = ""


class RecordError(ValueError):
    """An mDNS record that is not a valid agent advertisement."""


def list_agents(settings: Settings, *, refresh: bool = True, probe: bool = True) -> AgentListing:
    """Every target of the fleet (the local agent when it runs) after a bounded browse, with
    live facts from those that answer in time (without `probe`: the cached facts only)."""
    from mle_cli.targets.fleet import fleet_view, probe_targets

    fleet = fleet_view(settings, browse=refresh)
    targets = [t for t in fleet.targets if t.source != "local" or t.address]
    facts = probe_targets(targets, settings) if probe else {}
    return AgentListing([_row(t, facts.get(t.name)) for t in targets], fleet.warning)


def cached_agents(
    settings: Settings, found: Iterable[DiscoveredAgent] = ()
) -> list[dict[str, Any]]:
    """Record what was found, then every cached agent (`ledger.agents.discovered_agents` rows);
    no ledger is created for nothing."""
    from mle_cli.ledger import Ledger, agents

    found = list(found)
    if not found and not settings.ledger_path.exists():
        return []
    ledger = Ledger(settings.ledger_path)
    try:
        if found:
            agents.record_discovered(ledger, found, forget_after=settings.agent_forget_after)
        return agents.discovered_agents(ledger, settings.agent_gone_after)
    finally:
        ledger.close()


def discover_agents(seconds: float, interfaces: str = "all") -> Browse:
    """Browse mDNS for `seconds`; return the valid agent records heard."""
    networks = _networks(interfaces)
    if networks == ():  # zeroconf sends unicast-mode questions from any address without fail
        zc: Zeroconf | str = f"no interface has the address {interfaces}"
    else:
        zc = _open_zeroconf(interfaces)
    if isinstance(zc, str):
        return Browse(warning=f"mDNS is unavailable ({zc}); showing cached agents only")
    return _browse(zc, seconds, networks)


def _networks(interfaces: str) -> tuple[IPv4Network | IPv6Network, ...] | None:
    """The networks of the chosen interface addresses; None for all interfaces.

    Linux hands a multicast socket the packets of every interface that joined the group, so a
    record heard is kept only when one of its addresses is on a chosen interface's network."""
    chosen = {part.strip() for part in interfaces.split(",") if part.strip()} - {"all"}
    if not chosen:
        return None
    found = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.address.split("%")[0] in chosen and a.netmask:
                found.append(ip_network(f"{a.address.split('%')[0]}/{a.netmask}", strict=False))
    return tuple(found)


def _browse(
    zc: Zeroconf, seconds: float, networks: tuple[IPv4Network | IPv6Network, ...] | None = None
) -> Browse:
    """Browse with zeroconf for `seconds`, then close it (its threads end)."""
    from zeroconf import ServiceBrowser

    try:
        names: queue.SimpleQueue[str] = queue.SimpleQueue()
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[_Collector(names)])
        try:
            return _collect(zc, names, time.monotonic() + seconds, networks)
        finally:
            browser.cancel()
    finally:
        zc.close()


def parse_record(
    instance: str,
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    port: int | None,
    now: float,
) -> DiscoveredAgent:
    """Validate one record's TXT, addresses and port; raise RecordError when it is not an agent."""
    txt = _decode_txt(properties)
    if txt.get("proto") != PROTO_VERSION:
        raise RecordError(f"protocol {txt.get('proto')!r}, expected {PROTO_VERSION!r}")
    if not txt.get("ver"):
        raise RecordError("no 'ver'")
    if not port or not 0 < port < 65536:
        raise RecordError(f"invalid port {port!r}")
    if not addresses:
        raise RecordError("no address")
    fingerprint = txt.get("fp", "")
    if fingerprint and not _FINGERPRINT.fullmatch(fingerprint):
        raise RecordError("malformed 'fp'")
    return DiscoveredAgent(
        name=_agent_name(txt.get("name") or instance),
        address=_best_address(addresses),
        port=port,
        arch=txt.get("arch", ""),
        os=txt.get("os", ""),
        runtimes=_parse_runtimes(txt.get("rt", "")),
        labels=_parse_labels(txt.get("labels", "")),
        fingerprint=fingerprint,
        version=txt["ver"],
        last_seen=now,
    )


class _Collector:
    """A ServiceBrowser handler: queues the names of added or updated services."""

    def __init__(self, names: queue.SimpleQueue[str]) -> None:
        self.names = names

    def __call__(
        self, *, zeroconf: Zeroconf, service_type: str, name: str, state_change: Any
    ) -> None:
        if state_change.name != "Removed":
            self.names.put(name)


def _zeroconf_options(interfaces: str) -> dict[str, Any]:
    from zeroconf import InterfaceChoice, IPVersion

    # Legacy unicast (RFC 6762 6.7): questions from a port of our own, answered straight to it.
    # Bound to 5353 instead, an answer unicast to that port reaches just one of the sockets there
    # (avahi, another mle), and multicast answers are rate-limited to one a second per record.
    chosen = [part.strip() for part in interfaces.split(",") if part.strip()]
    if not chosen or chosen == ["all"]:
        return {"interfaces": InterfaceChoice.All, "ip_version": IPVersion.V4Only, "unicast": True}
    v6 = any(":" in address for address in chosen)
    version = IPVersion.All if v6 else IPVersion.V4Only
    return {"interfaces": chosen, "ip_version": version, "unicast": True}


def _open_zeroconf(interfaces: str) -> Zeroconf | str:
    """A Zeroconf bound to the chosen interfaces, or why it cannot be had."""
    import warnings

    from zeroconf import Zeroconf

    with warnings.catch_warnings():
        # A failed Zeroconf() leaves its socket to the garbage collector: no warning for that.
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            return Zeroconf(**_zeroconf_options(interfaces))
        except (OSError, ValueError) as exc:  # no multicast route, bad interface, port refused
            return str(exc) or type(exc).__name__


def _collect(
    zc: Zeroconf,
    names: queue.SimpleQueue[str],
    deadline: float,
    networks: tuple[IPv4Network | IPv6Network, ...] | None = None,
) -> Browse:
    """Resolve names as they arrive until the deadline; parse every record heard."""
    seen: dict[str, None] = {}
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            name = names.get(timeout=remaining)
        except queue.Empty:
            break
        if name not in seen:
            seen[name] = None
            _resolve(zc, name, min(remaining, _RESOLVE_WAIT))
    now = time.time()
    agents: dict[str, DiscoveredAgent] = {}
    for name in seen:  # from the cache, so the freshest TXT wins
        agent = _parse_cached(zc, name, now, networks)
        if agent is not None:
            agents[agent.name] = agent
    return Browse(tuple(agents.values()), ignored=len(seen) - len(agents))


def _resolve(zc: Zeroconf, name: str, wait: float) -> None:
    """Ask for a record's SRV/TXT/A unless the announcement already brought them."""
    from zeroconf import ServiceInfo

    info = ServiceInfo(SERVICE_TYPE, name)
    try:
        if not info.load_from_cache(zc):
            info.request(zc, timeout=wait * 1000)
    except Exception as exc:  # noqa: BLE001 - a hostile record must never stop the browse
        log.debug("ignoring mDNS record %.80r: cannot resolve it: %s", name, exc)


def _parse_cached(
    zc: Zeroconf,
    name: str,
    now: float,
    networks: tuple[IPv4Network | IPv6Network, ...] | None = None,
) -> DiscoveredAgent | None:
    from zeroconf import ServiceInfo

    try:
        info = ServiceInfo(SERVICE_TYPE, name)
        if not info.load_from_cache(zc):
            raise RecordError("no SRV/TXT/address answer")
        addresses = _addresses(info)
        if networks is not None:
            addresses = [a for a in addresses if _on(a, networks)]
            if not addresses:
                raise RecordError("no address on the chosen interfaces (mdns_interfaces)")
        return parse_record(_instance(name), _properties(info), addresses, info.port, now)
    except Exception as exc:  # noqa: BLE001 - zeroconf's parsing of hostile bytes may raise anything
        log.debug("ignoring mDNS record %.80r: %s", name, exc)
        return None


def _on(address: str, networks: tuple[IPv4Network | IPv6Network, ...]) -> bool:
    try:
        ip = ip_address(address.split("%")[0])
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _properties(info: ServiceInfo) -> Mapping[bytes, bytes | None]:
    if len(info.text or b"") > TXT_MAX_BYTES:
        raise RecordError(f"TXT record of {len(info.text or b'')} bytes (limit {TXT_MAX_BYTES})")
    return info.properties


def _addresses(info: ServiceInfo) -> list[str]:
    return [str(address) for address in info.parsed_scoped_addresses()]


def _instance(name: str) -> str:
    return name[: -len(SERVICE_TYPE) - 1] if name.endswith(f".{SERVICE_TYPE}") else name


def _decode_txt(properties: Mapping[bytes, bytes | None]) -> dict[str, str]:
    """TXT keys and values as text; raise RecordError on non-UTF-8 or control characters."""
    size = sum(len(k) + len(v or b"") + 2 for k, v in properties.items())
    if size > TXT_MAX_BYTES:
        raise RecordError(f"TXT record of {size} bytes (limit {TXT_MAX_BYTES})")
    txt: dict[str, str] = {}
    for raw_key, raw_value in properties.items():
        try:
            key, value = raw_key.decode(), (raw_value or b"").decode()
        except UnicodeDecodeError:
            raise RecordError(f"TXT {raw_key[:40]!r} is not UTF-8") from None
        if _CONTROL.search(key) or _CONTROL.search(value):
            raise RecordError(f"TXT {key[:40]!r} holds control characters")
        txt[key.lower()] = value
    return txt


def _agent_name(name: str) -> str:
    """A name that can be a target's: selectors.NAME (no glob, space or comma), no '..' (an
    empty DNS label: no certificate can be checked against it)."""
    if not NAME.fullmatch(name) or ".." in name:
        raise RecordError(f"invalid agent name {name[:80]!r}")
    return name


def _parse_labels(text: str) -> dict[str, str]:
    """`k=v,k=v` where keys and values follow the selector rules (labels are selected on)."""
    labels: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not LABEL_KEY.fullmatch(key) or not LABEL_VALUE.fullmatch(value):
            raise RecordError(f"malformed label {pair[:40]!r}")
        labels[key] = value
    return labels


def _parse_runtimes(text: str) -> tuple[str, ...]:
    runtimes = tuple(filter(None, (part.strip() for part in text.split(","))))
    if len(runtimes) > _MAX_RUNTIMES or not all(_RUNTIME.fullmatch(r) for r in runtimes):
        raise RecordError("malformed 'rt'")
    return runtimes


def _best_address(addresses: Sequence[str]) -> str:
    """An IPv4 address when there is one (link-local IPv6 needs a scope to be usable)."""
    return next((a for a in addresses if ":" not in a), addresses[0])


def _row(target: Target, facts: AgentFacts | None) -> dict[str, Any]:
    """One row of `mle agents --json`: the fleet's view, then what the agent itself said."""
    _, _, port = target.address.rpartition(":")
    row: dict[str, Any] = {
        "name": target.name,
        "address": target.address,
        "port": int(port) if port.isdigit() else None,
        "source": target.source,
        "state": target.state,
        "placeable": target.placeable,
        "first_seen": target.first_seen or None,
        "last_seen": target.last_seen or None,
        "arch": target.arch,
        "os": target.os,
        "runtimes": list(target.runtimes),
        "labels": dict(target.labels),
        "fingerprint": target.fingerprint,
        "version": target.version,
        "python": "",
        **dict.fromkeys(_LIVE_NUMBERS),
        "answered": False,
        "note": "",
    }
    if facts is not None:
        row.update(facts.row(target.labels))
    return row
