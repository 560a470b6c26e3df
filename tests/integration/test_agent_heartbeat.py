"""Agent.Heartbeat on a real in-process agent: at once, then every interval, until it drains."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from mle_agent.heartbeat import heartbeat_interval
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import Agent, agent_settings, leak_check, run, running_agent

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def test_the_first_heartbeat_comes_at_once_with_the_agents_facts(tmp_path: Path) -> None:
    async def scenario() -> tuple[pb.AgentHeartbeat, pb.AgentInfo, float]:
        async with running_agent(agent_settings(tmp_path, slots=3)) as agent:
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            asked = time.time()
            stream = agent.agent.Heartbeat(pb.HeartbeatRequest(interval_seconds=60))
            beat = await asyncio.wait_for(stream.read(), 10)  # long before the interval
            stream.cancel()
            return beat, info, asked

    beat, info, asked = run(scenario())
    assert (beat.name, beat.boot_id, beat.slots) == ("test-agent", info.boot_id, 3)
    assert (beat.running_tasks, list(beat.task_ids)) == (0, [])
    assert asked - 1 <= beat.time <= time.time()
    assert 0.0 <= beat.cpu_percent <= 100.0
    assert beat.load1 >= 0.0
    assert 0 < beat.memory_used_bytes < beat.memory_total_bytes == psutil.virtual_memory().total
    assert beat.disk_free_bytes > 0
    assert beat.HasField("temperature_celsius") == _has_temperature_sensor()


def test_heartbeats_keep_coming_and_list_the_running_tasks(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    # The task floods its log while it waits: heartbeats must not queue behind its events.
    script = f"while [ ! -e {gate} ]; do seq 1 200; sleep 0.01; done"

    async def scenario() -> list[pb.AgentHeartbeat]:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.start("r.hb.1", script)
            await agent.wait_state("r.hb.1", pb.TASK_STATE_RUNNING)
            beats: list[pb.AgentHeartbeat] = []
            async for beat in agent.agent.Heartbeat(pb.HeartbeatRequest(interval_seconds=0.05)):
                beats.append(beat)
                if len([b for b in beats if list(b.task_ids) == ["r.hb.1"]]) == 5:
                    gate.touch()
                if gate.exists() and not beat.task_ids:
                    break
            return beats

    beats = run(scenario())
    while_running = [b for b in beats if b.task_ids]
    assert len(while_running) >= 5
    assert all((b.running_tasks, list(b.task_ids)) == (1, ["r.hb.1"]) for b in while_running)
    assert beats[-1].running_tasks == 0
    assert len({b.boot_id for b in beats}) == 1


def test_the_interval_defaults_to_the_setting_and_is_clamped(tmp_path: Path) -> None:
    assert [heartbeat_interval(asked, 1.0) for asked in (0, 0.001, 2.5, 1e9, -1, math.nan)] == [
        1.0,
        0.05,
        2.5,
        60.0,
        1.0,
        1.0,
    ]

    async def times(agent: Agent, interval: float) -> list[float]:
        stream = agent.agent.Heartbeat(pb.HeartbeatRequest(interval_seconds=interval))
        beats = [await stream.read() for _ in range(4)]
        stream.cancel()
        return [b.time for b in beats]

    async def scenario() -> tuple[list[float], list[float]]:
        async with running_agent(agent_settings(tmp_path, heartbeat_interval=0.2)) as agent:
            return await times(agent, 0), await times(agent, 0.000001)

    default, clamped = run(scenario())
    assert min(b - a for a, b in itertools.pairwise(default)) >= 0.19
    assert min(b - a for a, b in itertools.pairwise(clamped)) >= 0.049


def test_the_stream_ends_when_the_agent_drains(tmp_path: Path) -> None:
    async def scenario() -> tuple[int, grpc.StatusCode]:
        async with running_agent(agent_settings(tmp_path)) as agent:
            stream = agent.agent.Heartbeat(pb.HeartbeatRequest(interval_seconds=60))
            count = 0
            async for _ in stream:
                count += 1
                if count == 1:
                    await agent.manager.drain(5.0)
            return count, await stream.code()

    assert run(scenario()) == (1, grpc.StatusCode.OK)  # ended cleanly, not after 60s


def _has_temperature_sensor() -> bool:
    read = getattr(psutil, "sensors_temperatures", None)
    return read is not None and any(e.current is not None for es in read().values() for e in es)
