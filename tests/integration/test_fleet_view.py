"""The fleet view against real agents: in-process agents with mutual TLS from the project CA,
announced by real zeroconf on 127.0.0.1, an inventory file, and a real ledger in tmp_path.

Other tests on this machine may announce on loopback too, so assertions name their agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from mle_agent.announce import announced
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint, resolve_target
from mle_cli.targets.connection import connect
from mle_cli.targets.discovery import list_agents
from mle_cli.targets.fleet import AgentFacts, Target, fleet_view, probe_targets
from mle_proto.errors import NotFound
from tests.agent_helpers import agent_settings, leak_check, run, running_agent
from tests.mdns_helpers import LOOPBACK, fast_mdns, unique
from tests.pki_helpers import issue_agent_tls

pytestmark = pytest.mark.timeout(90)
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture(autouse=True)
def _fast_mdns(monkeypatch: pytest.MonkeyPatch) -> None:
    fast_mdns(monkeypatch)


def _operator(tmp_path: Path) -> Settings:
    project = tmp_path / "project"
    (project / "targets").mkdir(parents=True)
    return Settings(project_dir=project, mdns_browse_seconds=1.0, mdns_interfaces=LOOPBACK)


def _poll(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    value = read()
    while not done(value) and time.monotonic() < deadline:
        value = read()
    return value


def _target(settings: Settings, name: str) -> Target | None:
    return next((t for t in fleet_view(settings, browse=True).targets if t.name == name), None)


def _resolved(settings: Settings, name: str) -> Endpoint | str:
    try:
        return resolve_target(name, settings)
    except NotFound as exc:
        return str(exc)


def _rows(settings: Settings, refresh: bool = True) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in list_agents(settings, refresh=refresh).rows}


def test_an_inventory_entry_wins_over_the_mdns_record_of_the_same_agent(tmp_path: Path) -> None:
    settings = _operator(tmp_path)
    name = unique("edge")
    tls = issue_agent_tls(settings, name)
    agent = tls.apply(
        agent_settings(
            tmp_path,
            labels={"role": "edge", "site": "lab"},
            announce=True,
            announce_interfaces=LOOPBACK,
        )
    )
    (settings.project_dir / "targets" / "edge.yaml").write_text(
        f"name: {name}\nlabels: {{role: server}}\nagent: {{port: 9}}\n"
    )

    async def scenario() -> tuple[Target | None, dict[str, dict[str, Any]], int]:
        async with running_agent(agent) as running, announced(agent, running.port):
            seen = await asyncio.to_thread(
                _poll, lambda: _target(settings, name), lambda t: t is not None and t.last_seen > 0
            )
            rows = await asyncio.to_thread(_rows, settings, False)
            return seen, rows, running.port

    target, rows, port = run(scenario())
    assert target is not None, f"{name} was not discovered"
    assert (target.source, target.state) == ("inventory+mdns", "up")
    assert target.address == f"{LOOPBACK}:9"  # mDNS said {port}; the inventory's port wins
    assert port != 9
    assert target.labels == {"role": "server", "site": "lab"}  # inventory keys win
    assert target.fingerprint == tls.fingerprint and target.arch and target.version
    # Dialled where the inventory says (nobody there): listed with its cached facts and a note.
    row = rows[name]
    assert (row["source"], row["state"], row["answered"]) == ("inventory+mdns", "up", False)
    assert row["arch"] == target.arch and row["cpus"] is None
    assert row["note"].startswith(f"agent {name}: unreachable")


def test_an_announced_tls_agent_is_listed_with_its_live_facts(tmp_path: Path) -> None:
    settings = _operator(tmp_path)
    name = unique("pi")
    tls = issue_agent_tls(settings, name)
    agent = tls.apply(agent_settings(tmp_path, announce=True, announce_interfaces=LOOPBACK))

    async def scenario() -> tuple[Endpoint | str, dict[str, Any], int]:
        async with running_agent(agent) as running, announced(agent, running.port):
            # Nothing has browsed yet: resolving the name browses once when the cache misses.
            endpoint = await asyncio.to_thread(
                _poll, lambda: _resolved(settings, name), lambda e: isinstance(e, Endpoint)
            )
            rows = await asyncio.to_thread(
                _poll, lambda: _rows(settings), lambda r: r.get(name, {}).get("answered", False)
            )
            return endpoint, rows.get(name, {}), running.port

    endpoint, row, port = run(scenario())
    assert isinstance(endpoint, Endpoint), endpoint
    assert (endpoint.address, endpoint.fingerprint) == (f"{LOOPBACK}:{port}", tls.fingerprint)
    assert (row["source"], row["state"], row["answered"], row["note"]) == ("mdns", "up", True, "")
    assert row["fingerprint"] == tls.fingerprint
    assert row["python"].count(".") == 2 and row["cpus"] >= 1 and row["slots"] == 4
    assert row["memory_bytes"] > 0 and row["disk_free_bytes"] > 0 and row["running_tasks"] == 0
    assert row["load1"] is not None and row["load1"] >= 0
    assert 0 < row["memory_used_bytes"] <= row["memory_bytes"]
    assert row["labels"] == {"role": "test"}


def test_an_inventory_only_agent_with_a_host_is_dialled_over_mutual_tls(tmp_path: Path) -> None:
    settings = _operator(tmp_path)
    name = unique("srv")
    tls = issue_agent_tls(settings, name)
    agent = tls.apply(agent_settings(tmp_path))  # not announced: only the inventory knows it
    inventory = settings.project_dir / "targets" / "cloud.yaml"

    async def scenario() -> tuple[Target | None, dict[str, Any], str]:
        async with running_agent(agent) as running:
            inventory.write_text(
                f"- name: {name}\n  host: {LOOPBACK}\n  agent: {{port: {running.port}}}\n"
                "  labels: {role: server}\n"
                "- name: nowhere-1\n"
            )
            target = await asyncio.to_thread(_target, settings, name)
            rows = await asyncio.to_thread(_rows, settings, False)
            endpoint = await asyncio.to_thread(resolve_target, name, settings)
            conn = await connect(endpoint, 10.0)
            try:
                info = await conn.info()
            finally:
                await conn.close()
            return target, rows, info.name

    target, rows, answered_as = run(scenario())
    assert target is not None
    assert (target.source, target.state, target.placeable) == ("inventory", "unknown", True)
    row = rows[name]
    assert (row["source"], row["state"], row["answered"]) == ("inventory", "up", True)
    assert row["labels"] == {"role": "server"} and row["cpus"] >= 1 and row["fingerprint"] == ""
    assert answered_as == name
    nowhere = rows["nowhere-1"]
    assert (nowhere["state"], nowhere["placeable"], nowhere["address"]) == ("unknown", False, "")
    assert "has no host and mDNS has not seen it" in nowhere["note"]


# More than the default thread pool ever holds (min(32, cpus + 4)): a check of an agent's identity
# that took a pool thread would wait behind these until its probe timed out.
SILENT = 40


@contextlib.contextmanager
def _silent_listener() -> Iterator[int]:
    """A TCP port whose connections the kernel accepts and nobody ever answers; its number."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_silent_hosts_do_not_starve_the_probe_of_an_agent_that_answers(tmp_path: Path) -> None:
    settings = _operator(tmp_path)
    name = f"zz-{unique('ok')}"  # sorted after the silent ones: asked last
    agent = issue_agent_tls(settings, name).apply(agent_settings(tmp_path))
    inventory = settings.project_dir / "targets" / "fleet.yaml"

    async def scenario(ports: list[int]) -> dict[str, AgentFacts]:
        async with running_agent(agent) as running:
            entries = [(f"aa-silent-{i:02d}", port) for i, port in enumerate(ports)]
            inventory.write_text(
                "".join(
                    f"- name: {entry}\n  host: {LOOPBACK}\n  agent: {{port: {port}}}\n"
                    for entry, port in [*entries, (name, running.port)]
                )
            )
            targets = fleet_view(settings).targets
            return await asyncio.to_thread(probe_targets, targets, settings)

    with contextlib.ExitStack() as stack:
        ports = [stack.enter_context(_silent_listener()) for _ in range(SILENT)]
        facts = run(scenario(ports))
    assert facts[name].answered, facts[name].note
    assert facts[name].cpus >= 1
    silent = [facts[f"aa-silent-{i:02d}"] for i in range(SILENT)]
    assert not any(f.answered for f in silent)
