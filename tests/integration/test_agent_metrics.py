"""Heartbeats into the ledger (`agent_metrics`) and the fleet watch behind `mle top`, against real
in-process agents on loopback and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from mle_agent.settings import AgentSettings
from mle_cli.fleetwatch import AgentView, FleetSnapshot, snapshot_fleet, watch_fleet
from mle_cli.ledger import Ledger, LedgerWriter, agent_metrics
from mle_cli.settings import Settings
from mle_cli.targets import Endpoint
from mle_cli.targets.connection import connect
from mle_cli.targets.fleet import Target
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import Agent, agent_settings, leak_check, run, running_agent

pytestmark = pytest.mark.timeout(90)
DOWN = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _settings(tmp_path: Path) -> Settings:
    return Settings(project_dir=tmp_path, heartbeat_interval=0.1, agent_grace=1.0, rpc_timeout=5.0)


def _endpoint(name: str, agent: Agent) -> Endpoint:
    return Endpoint(name, f"127.0.0.1:{agent.port}")


def _query(path: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


async def _until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never true within {timeout:g}s: {what}"
        await asyncio.sleep(0.02)


async def _record_beats(
    agent: Agent, name: str, writer: LedgerWriter, count: int, keep: int
) -> list[pb.AgentHeartbeat]:
    """Follow the agent's heartbeats through a real connection, recording each; the beats."""
    conn = await connect(_endpoint(name, agent), 5.0)
    record = agent_metrics.heartbeat_recorder(writer, name, keep)
    beats: list[pb.AgentHeartbeat] = []

    def hook(beat: pb.AgentHeartbeat) -> None:
        beats.append(beat)
        record(beat)

    conn.on_heartbeat = hook
    conn.follow_heartbeats(0.05)
    try:
        await _until(lambda: len(beats) >= count, f"{count} heartbeats")
    finally:
        await conn.close()
    await writer.flush()
    return beats


def test_every_heartbeat_is_recorded_with_the_machines_figures(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"

    async def scenario() -> tuple[list[pb.AgentHeartbeat], pb.AgentInfo]:
        writer = LedgerWriter(path)
        try:
            async with running_agent(agent_settings(tmp_path, slots=3)) as agent:
                info = await agent.agent.GetInfo(pb.GetInfoRequest())
                return await _record_beats(agent, "edge-1", writer, 6, keep=100), info
        finally:
            writer.close()

    beats, info = run(scenario())
    ledger = Ledger(path)
    try:
        series = agent_metrics.metrics_series(ledger, "edge-1")
        latest = agent_metrics.latest_metrics(ledger)
        later = agent_metrics.metrics_series(ledger, "edge-1", since=series[2]["time"])
    finally:
        ledger.close()
    assert len(series) == len(beats) >= 6
    assert [row["time"] for row in series] == sorted(row["time"] for row in series)
    assert later == series[2:]
    assert list(latest) == ["edge-1"] and latest["edge-1"] == series[-1]
    last, beat = series[-1], beats[-1]
    assert (last["boot_id"], last["slots"], last["running_tasks"]) == (info.boot_id, 3, 0)
    assert last["memory_total"] == psutil.virtual_memory().total == beat.memory_total_bytes
    assert 0 < last["memory_used"] == beat.memory_used_bytes < last["memory_total"]
    assert (last["cpu_percent"], last["load1"]) == (beat.cpu_percent, beat.load1)
    assert last["disk_free"] == beat.disk_free_bytes > 0
    has_sensor = beat.HasField("temperature_celsius")
    assert (last["temperature"] is not None) == has_sensor


def test_a_missing_temperature_is_null_and_a_present_one_is_kept(tmp_path: Path) -> None:
    async def scenario() -> pb.AgentHeartbeat:
        async with running_agent(agent_settings(tmp_path)) as agent:
            stream = agent.agent.Heartbeat(pb.HeartbeatRequest(interval_seconds=1))
            beat: pb.AgentHeartbeat = await asyncio.wait_for(stream.read(), 10)
            stream.cancel()
            return beat

    beat = run(scenario())
    no_sensor, pi = pb.AgentHeartbeat(), pb.AgentHeartbeat()
    no_sensor.CopyFrom(beat)
    no_sensor.ClearField("temperature_celsius")
    pi.CopyFrom(beat)
    pi.temperature_celsius = 47.5
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    try:
        rows = [
            agent_metrics.heartbeat_row("x86", no_sensor),
            agent_metrics.heartbeat_row("pi", pi),
        ]
        assert agent_metrics.record_heartbeats(ledger, rows) == 2
    finally:
        ledger.close()
    stored = _query(path, "SELECT agent, temperature, typeof(temperature) FROM agent_metrics")
    assert sorted(stored) == [("pi", 47.5, "real"), ("x86", None, "null")]


def test_the_cap_keeps_each_agents_newest_rows(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = Ledger(path)
    old = agent_metrics.MetricSample("other", 1.0, "b", 1.0, 0.1, 1, 2, 3, None, 0, 1)
    agent_metrics.record_heartbeats(ledger, [old, old, old], keep=5)
    ledger.close()

    async def scenario() -> None:
        writer = LedgerWriter(path)
        try:
            async with running_agent(agent_settings(tmp_path)) as agent:
                await _record_beats(agent, "edge-1", writer, 12, keep=5)
        finally:
            writer.close()

    run(scenario())
    times = [t for (t,) in _query(path, "SELECT time FROM agent_metrics WHERE agent = 'edge-1'")]
    assert len(times) == 5
    newest = _query(path, "SELECT MAX(time) FROM agent_metrics WHERE agent = 'edge-1'")[0][0]
    assert max(times) == newest
    assert _query(path, "SELECT COUNT(*) FROM agent_metrics WHERE agent = 'other'") == [(3,)]
    ledger = Ledger(path)
    try:  # one more row over the cap drops exactly the oldest one
        first = min(times)
        sample = agent_metrics.MetricSample(
            "edge-1", newest + 1, "b", 1.0, 0.1, 1, 2, 3, None, 0, 1
        )
        agent_metrics.record_heartbeats(ledger, [sample], keep=5)
        kept = agent_metrics.metrics_series(ledger, "edge-1")
    finally:
        ledger.close()
    assert [row["time"] for row in kept] == [*sorted(t for t in times if t != first), newest + 1]


def _view(snapshot: FleetSnapshot, name: str) -> AgentView:
    return {agent.name: agent for agent in snapshot.agents}[name]


def _states(snapshot: FleetSnapshot | None) -> dict[str, str]:
    return {a.name: a.state for a in snapshot.agents} if snapshot else {}


def test_the_watch_follows_agents_as_they_come_and_go(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    fleet = [Target("down", DOWN, source="inventory", state="unknown")]
    endpoints = {"down": Endpoint("down", DOWN)}
    last: list[FleetSnapshot] = []

    def shown() -> dict[str, str]:
        return _states(last[-1] if last else None)

    async def scenario() -> FleetSnapshot:
        stop = asyncio.Event()
        async with contextlib.AsyncExitStack() as leaving:
            edge = await leaving.enter_async_context(running_agent(_agent(tmp_path, "edge")))
            async with running_agent(_agent(tmp_path, "server")) as server:
                for name, agent in (("edge", edge), ("server", server)):
                    endpoints[name] = _endpoint(name, agent)
                fleet.append(Target("server", endpoints["server"].address, source="mdns"))
                watching = asyncio.create_task(
                    watch_fleet(
                        settings,
                        last.append,
                        stop,
                        interval=0.1,
                        fleet_every=0.2,
                        targets=lambda browse: list(fleet),
                        resolve=endpoints.__getitem__,
                    )
                )
                await _until(lambda: shown() == {"down": "unreachable", "server": "up"}, "up")
                fleet.append(Target("edge", endpoints["edge"].address, source="mdns"))
                await _until(lambda: shown().get("edge") == "up", "edge joins")
                await leaving.aclose()  # edge stops
                await _until(lambda: shown().get("edge") == "silent", "edge silent")
                assert shown()["server"] == "up"
                stop.set()
                await asyncio.wait_for(watching, 30)
        return last[-1]

    final = run(scenario())
    edge, server, down = (_view(final, name) for name in ("edge", "server", "down"))
    assert edge.sample is not None and edge.silent_for is not None and edge.silent_for > 1.0
    assert server.sample is not None and server.cpus >= 1
    assert down.sample is None and "down" in down.error and down.address == DOWN
    assert [a.name for a in final.agents] == ["down", "server", "edge"]
    db = settings.ledger_path
    counts = dict(_query(db, "SELECT agent, COUNT(*) FROM agent_metrics GROUP BY agent"))
    assert set(counts) == {"edge", "server"} and min(counts.values()) >= 1
    assert _query(db, "SELECT MAX(time) FROM agent_metrics WHERE agent = 'edge'") == [
        (edge.sample.time,)
    ]


def test_one_snapshot_waits_for_the_first_beats_and_shows_earlier_ones(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    ledger = Ledger(settings.ledger_path)
    earlier = agent_metrics.MetricSample(
        "pi-02", time.time() - 60, "b", 5.0, 0.5, 1, 2, 3, 51.0, 0, 4
    )
    agent_metrics.record_heartbeats(ledger, [earlier])
    ledger.close()

    async def scenario() -> FleetSnapshot:
        async with running_agent(_agent(tmp_path, "edge")) as edge:
            endpoints = {"edge": _endpoint("edge", edge), "down": Endpoint("down", DOWN)}
            fleet = [
                Target("edge", endpoints["edge"].address, source="mdns"),
                Target("down", DOWN, source="inventory", state="unknown"),
                Target("pi-02", "", source="mdns", state="gone"),
            ]
            return await snapshot_fleet(
                settings,
                interval=0.1,
                wait=30,
                targets=lambda browse: fleet,
                resolve=endpoints.__getitem__,
            )

    snapshot = run(scenario())
    assert _states(snapshot) == {"edge": "up", "down": "unreachable", "pi-02": "gone"}
    edge = _view(snapshot, "edge").as_dict()
    assert edge["memory_total"] == psutil.virtual_memory().total and edge["cpus"] >= 1
    assert edge["slots"] == 4 and edge["running_tasks"] == 0 and edge["error"] == ""
    pi = _view(snapshot, "pi-02")
    assert pi.sample == earlier and pi.error == "" and pi.silent_for is not None
    assert pi.silent_for >= 60 and pi.as_dict()["temperature"] == 51.0
    rows = _query(settings.ledger_path, "SELECT agent FROM agent_metrics WHERE agent = 'edge'")
    assert len(rows) >= 1


def _agent(tmp_path: Path, name: str) -> AgentSettings:
    return agent_settings(tmp_path / name, name=name)


def test_a_version_4_ledger_gains_the_table_and_keeps_its_agents(tmp_path: Path) -> None:
    from mle_cli.ledger._schema import _MIGRATIONS, SCHEMA_VERSION

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for migration in _MIGRATIONS[:4]:
        conn.executescript(migration)
    conn.execute(
        "INSERT INTO discovered_agents VALUES ('pi-01', '10.0.0.5', 7443, 'aarch64', 'Linux', "
        "'[]', '{}', '', '0.1', 'mdns', 1.0, 2.0)"
    )
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    try:
        sample = agent_metrics.MetricSample("pi-01", 3.0, "b", 1.0, 0.1, 1, 2, 3, None, 0, 1)
        agent_metrics.record_heartbeats(ledger, [sample])
        assert agent_metrics.latest_metrics(ledger)["pi-01"]["time"] == 3.0
    finally:
        ledger.close()
    assert _query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION >= 5
    assert _query(path, "SELECT name FROM discovered_agents") == [("pi-01",)]
