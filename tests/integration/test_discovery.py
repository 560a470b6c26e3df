"""mDNS discovery with real zeroconf on 127.0.0.1: announce, browse, hostile records, the cache.

Multicast works on the loopback interface here when zeroconf binds to 127.0.0.1 only, IPv4 only
(`interfaces=["127.0.0.1"]`, `IPVersion.V4Only`); the agent and the browser use exactly that.
Other tests on this machine may announce on loopback too, so assertions name their agents.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import psutil
import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from mle_agent.announce import SERVICE_TYPE, announced, txt_record
from mle_cli.ledger import Ledger
from mle_cli.ledger._agents import discovered_agents
from mle_cli.settings import Settings
from mle_cli.targets.discovery import Browse, DiscoveredAgent, discover_agents, list_agents
from tests.agent_helpers import agent_settings, leak_check, run
from tests.mdns_helpers import LOOPBACK, fast_mdns, unique

pytestmark = pytest.mark.timeout(60)
DISCOVERY_LOG = "mle_cli.targets.discovery"
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture(autouse=True)
def _fast_mdns(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_mdns(monkeypatch)


def _browse_until(
    found: Callable[[Browse], bool], seconds: float = 1.0, timeout: float = 20.0
) -> Browse:
    """Browse (bounded each time) until `found` holds; the last browse."""
    deadline = time.monotonic() + timeout
    while True:
        browse = discover_agents(seconds, LOOPBACK)
        if found(browse) or time.monotonic() > deadline:
            return browse


def _named(browse: Browse, name: str) -> DiscoveredAgent | None:
    return next((a for a in browse.agents if a.name == name), None)


def test_an_announced_agent_is_found_with_its_facts(tmp_path: Path) -> None:
    name = unique("pi-01")
    settings = agent_settings(
        tmp_path,
        name=name,
        labels={"role": "edge", "site": "lab"},
        announce=True,
        announce_interfaces=LOOPBACK,
    )

    async def scenario() -> Browse:
        async with announced(settings, 7443):
            return await asyncio.to_thread(_browse_until, lambda b: _named(b, name) is not None)

    agent = _named(run(scenario()), name)
    assert agent is not None, f"{name} was not discovered"
    txt = txt_record(settings)
    assert (agent.address, agent.port, agent.endpoint) == (LOOPBACK, 7443, f"{LOOPBACK}:7443")
    assert agent.labels == {"role": "edge", "site": "lab"}
    assert agent.runtimes == tuple(filter(None, txt["rt"].split(",")))
    assert (agent.arch, agent.os, agent.version) == (txt["arch"], txt["os"], txt["ver"])
    assert agent.fingerprint == "" and agent.last_seen > 0


def test_a_loopback_agent_does_not_announce_unless_asked(tmp_path: Path) -> None:
    name = unique("quiet")
    settings = agent_settings(tmp_path, name=name, announce_interfaces=LOOPBACK)

    async def scenario() -> Browse:
        async with announced(settings, 7443):
            return await asyncio.to_thread(discover_agents, 1.0, LOOPBACK)

    assert _named(run(scenario()), name) is None


HOSTILE: dict[str, dict[bytes, bytes]] = {
    "wrong-proto": {b"proto": b"v9", b"ver": b"0.1.0"},
    "no-version": {b"proto": b"v1"},
    "not-utf8": {b"proto": b"v1", b"ver": b"0.1.0", b"labels": b"role=\xff\xfe"},
    "huge": {b"proto": b"v1", b"ver": b"0.1.0", **{b"x%d" % i: b"y" * 240 for i in range(8)}},
    "bad-labels": {b"proto": b"v1", b"ver": b"0.1.0", b"labels": b"===,=x"},
    "escape": {b"proto": b"v1", b"ver": b"0.1.0", b"name": b"\x1b[31mevil"},
    "bad-fp": {b"proto": b"v1", b"ver": b"0.1.0", b"fp": b"md5:abc"},
    "glob-name": {b"proto": b"v1", b"ver": b"0.1.0", b"name": b"pi-*"},
    "label-value": {b"proto": b"v1", b"ver": b"0.1.0", b"labels": b"role=edge lab"},
}


def _publish(zc: Zeroconf, instance: str, properties: dict[bytes, bytes]) -> ServiceInfo:
    info = ServiceInfo(
        SERVICE_TYPE,
        f"{instance}.{SERVICE_TYPE}",
        port=7443,
        addresses=[socket.inet_aton(LOOPBACK)],
        properties=properties,
        server=f"{instance}.local.",
    )
    zc.register_service(info)
    return info


def _send_garbage() -> None:
    """A datagram that is no DNS message at all, to the mDNS group on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOPBACK))
        sock.sendto(b"\x00\x01garbage\xff" * 50, ("224.0.0.251", 5353))


def test_hostile_records_are_ignored_with_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=DISCOVERY_LOG)
    suffix = unique("")
    good = f"good{suffix}"
    zc = Zeroconf(interfaces=[LOOPBACK], ip_version=IPVersion.V4Only)
    try:
        _publish(zc, good, {b"proto": b"v1", b"ver": b"0.1.0", b"labels": b"role=edge"})
        for kind, properties in HOSTILE.items():
            _publish(zc, f"{kind}{suffix}", properties)
        _send_garbage()
        browse = _browse_until(lambda b: _named(b, good) is not None, seconds=1.5)
    finally:
        zc.close()
    names = {agent.name for agent in browse.agents}
    assert good in names
    assert not any(name.endswith(suffix) and name != good for name in names)
    assert browse.ignored >= len(HOSTILE)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    for kind in HOSTILE:
        assert any("ignoring mDNS record" in m and f"{kind}{suffix}" in m for m in debug), kind


def test_a_withdrawn_agent_stays_cached_and_is_marked_gone(tmp_path: Path) -> None:
    name = unique("edge")
    agent = agent_settings(tmp_path, name=name, announce=True, announce_interfaces=LOOPBACK)
    settings = Settings(
        project_dir=tmp_path,
        mdns_browse_seconds=1.0,
        mdns_interfaces=LOOPBACK,
        agent_gone_after=0.5,
    )

    def listed() -> dict[str, str]:
        return {row["name"]: row["state"] for row in list_agents(settings).rows}

    async def seen_while_announced() -> dict[str, str]:
        async with announced(agent, 7443):
            return await asyncio.to_thread(_poll, listed, lambda rows: name in rows)

    assert run(seen_while_announced())[name] == "up"
    # Withdrawn (goodbye sent): no longer heard, so gone once unseen for agent_gone_after.
    assert _poll(listed, lambda rows: rows.get(name) == "gone")[name] == "gone"
    ledger = Ledger(settings.ledger_path)
    try:
        row = next(r for r in discovered_agents(ledger, 0.5) if r["name"] == name)
        assert discovered_agents(ledger, 3600, now=row["last_seen"] + 1)[0]["state"] == "up"
    finally:
        ledger.close()
    assert row["source"] == "mdns" and row["state"] == "gone"


def test_mdns_unavailable_is_a_warning_and_the_cache_still_answers(tmp_path: Path) -> None:
    # An address no interface has: zeroconf cannot bind, the listing falls back to the cache.
    settings = Settings(
        project_dir=tmp_path, mdns_browse_seconds=0.5, mdns_interfaces="192.0.2.123"
    )
    ledger = Ledger(settings.ledger_path)
    try:
        from mle_cli.ledger._agents import record_discovered

        record_discovered(ledger, [DiscoveredAgent("cached-1", "10.0.0.5", 7443, last_seen=1.0)])
    finally:
        ledger.close()
    listing = list_agents(replace(settings))
    assert "mDNS is unavailable" in listing.warning
    assert [(r["name"], r["address"], r["state"]) for r in listing.rows] == [
        ("cached-1", "10.0.0.5:7443", "gone")
    ]


def _poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        time.sleep(0.1)
        value = read()
    return value


def _other_ipv4() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


def test_browsing_on_chosen_interfaces_ignores_agents_heard_elsewhere(tmp_path: Path) -> None:
    other = _other_ipv4()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address to browse on")
    name = unique("elsewhere")
    settings = agent_settings(tmp_path, name=name, announce=True, announce_interfaces=LOOPBACK)

    async def scenario() -> tuple[Browse, Browse]:
        async with announced(settings, 7443):
            heard = await asyncio.to_thread(_browse_until, lambda b: _named(b, name) is not None)
            return heard, await asyncio.to_thread(discover_agents, 1.5, other)

    on_loopback, on_other = run(scenario())
    assert _named(on_loopback, name) is not None  # it is announced, and heard on loopback
    assert _named(on_other, name) is None  # but not on the network of `other`
