"""The Artifacts service on a real in-process agent: Stat, chunked Put, resumable Get, limits."""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from mle_proto.errors import ResourceExhausted, from_rpc_error
from mle_proto.store import PendingArtifact
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import (
    Agent,
    agent_settings,
    digest_of,
    leak_check,
    put_chunks,
    run,
    running_agent,
)

pytestmark = pytest.mark.timeout(60)
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _store_files(agent: Agent) -> list[Path]:
    return sorted(p for p in agent.settings.artifacts_root.rglob("*") if p.is_file())


async def _rpc_error(awaitable: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value


def test_put_stat_get_round_trip(tmp_path: Path) -> None:
    data = os.urandom(2 * MiB + MiB // 2)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            absent = await agent.artifacts.Stat(pb.StatRequest(digests=[digest]))
            assert [(a.digest, a.present, a.size) for a in absent.artifacts] == [(digest, False, 0)]
            put = await agent.put(data, chunk=MiB)
            assert (put.digest, put.size, put.existed) == (digest, len(data), False)
            again = await agent.put(data, chunk=MiB)
            assert (again.digest, again.existed) == (digest, True)
            present = await agent.artifacts.Stat(pb.StatRequest(digests=[digest]))
            assert [(a.present, a.size) for a in present.artifacts] == [(True, len(data))]
            chunks = await agent.get(digest)
            assert [len(c.data) for c in chunks] == [MiB, MiB, MiB // 2]
            assert [c.size for c in chunks] == [len(data), 0, 0]
            assert b"".join(c.data for c in chunks) == data

    run(scenario())


def test_get_resumes_from_an_offset(tmp_path: Path) -> None:
    data = os.urandom(MiB + 1000)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            await agent.put(data)
            tail = await agent.get(digest, offset=MiB - 24)
            assert tail[0].size == len(data)
            assert b"".join(c.data for c in tail) == data[MiB - 24 :]
            at_end = await agent.get(digest, offset=len(data))
            assert [(c.data, c.size) for c in at_end] == [(b"", len(data))]
            error = await _rpc_error(agent.get(digest, offset=len(data) + 1))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            beyond = len(data) + 1
            assert error.details() == f"offset {beyond} is beyond the artifact's size {len(data)}"
            missing = await _rpc_error(agent.get(digest_of(b"other")))
            assert missing.code() == grpc.StatusCode.NOT_FOUND
            assert missing.details() == f"artifact {digest_of(b'other')} is not on this agent"

    run(scenario())


def test_put_with_a_wrong_digest_stores_nothing(tmp_path: Path) -> None:
    data = b"real content" * 1000
    claimed = digest_of(b"something else")

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            stream = put_chunks(data, 4096, digest=claimed)
            error = await _rpc_error(agent.artifacts.Put(stream))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == (
                f"digest mismatch: expected {claimed}, received {digest_of(data)}"
            )
            assert _store_files(agent) == []  # no artifact, no partial file
            stat = await agent.artifacts.Stat(pb.StatRequest(digests=[claimed, digest_of(data)]))
            assert [a.present for a in stat.artifacts] == [False, False]

    run(scenario())


@pytest.mark.parametrize(
    ("chunks", "details"),
    [
        ([], "Put must start with a header chunk (digest and size)"),
        ([pb.PutChunk(data=b"abc")], "Put must start with a header chunk (digest and size)"),
        (
            [pb.PutChunk(header=pb.PutHeader(digest="sha256:abc", size=3))],
            "not a sha256 digest: 'sha256:abc'",
        ),
        (
            [
                pb.PutChunk(header=pb.PutHeader(digest=digest_of(b"abc"), size=3)),
                pb.PutChunk(header=pb.PutHeader(digest=digest_of(b"abc"), size=3)),
            ],
            "Put: only the first chunk may carry a header",
        ),
        (
            [
                pb.PutChunk(header=pb.PutHeader(digest=digest_of(b"abc"), size=2)),
                pb.PutChunk(data=b"abc"),
            ],
            "size mismatch: header says 2 bytes, received more",
        ),
        (
            [
                pb.PutChunk(header=pb.PutHeader(digest=digest_of(b"abc"), size=4)),
                pb.PutChunk(data=b"abc"),
            ],
            "size mismatch: header says 4 bytes, received 3",
        ),
    ],
)
def test_malformed_puts_are_refused(
    tmp_path: Path, chunks: list[pb.PutChunk], details: str
) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            error = await _rpc_error(agent.artifacts.Put(iter(chunks)))
            assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
            assert _store_files(agent) == []

    run(scenario())


def test_a_put_larger_than_the_free_disk_is_resource_exhausted(tmp_path: Path) -> None:
    header = pb.PutHeader(digest=digest_of(b"huge"), size=2**62)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            error = await _rpc_error(agent.artifacts.Put(iter([pb.PutChunk(header=header)])))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details().startswith("not enough disk space on the agent")

    run(scenario())


def test_stat_with_a_bad_digest_is_invalid(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            error = await _rpc_error(agent.artifacts.Stat(pb.StatRequest(digests=["../../etc"])))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error.details() == "not a sha256 digest: '../../etc'"

    run(scenario())


def test_oversized_messages_are_refused_and_the_agent_stays_up(tmp_path: Path) -> None:
    big = "x" * (5 * MiB)

    async def one_big_chunk() -> AsyncIterator[pb.PutChunk]:
        yield pb.PutChunk(header=pb.PutHeader(digest=digest_of(big.encode()), size=len(big)))
        yield pb.PutChunk(data=big.encode())

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            error = await _rpc_error(agent.start("r.big.1", "true", env={"BIG": big}))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            error = await _rpc_error(agent.artifacts.Put(one_big_chunk()))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            assert info.name == "test-agent"
            assert (await agent.agent.ListTasks(pb.ListTasksRequest())).tasks == []
            assert _store_files(agent) == []

    run(scenario())


def test_a_full_disk_is_resource_exhausted_and_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self: PendingArtifact, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PendingArtifact, "write", disk_full)

    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path)) as agent:
            error = await _rpc_error(agent.put(b"x" * 1000))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error.details() == "the agent's disk is full"
            assert _store_files(agent) == []
            assert (await agent.agent.GetInfo(pb.GetInfoRequest())).name == "test-agent"

    run(scenario())


def test_a_message_over_the_agents_limit_is_one_line_saying_what_to_do(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    big = pb.TaskSpec(task_id="r.s.1", shell="x" * (settings.max_message_bytes + MiB))

    async def scenario() -> None:
        async with running_agent(settings) as agent:
            error = await _rpc_error(agent.agent.StartTask(big))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            translated = from_rpc_error(error, agent="pi-01")
            assert isinstance(translated, ResourceExhausted)
            size, limit = big.ByteSize() / 1e6, settings.max_message_bytes / 1e6
            assert str(translated) == (
                f"agent pi-01: a message of {size:.1f} MB is over the {limit:.1f} MB limit; send "
                "less at once (fewer rows), or raise the agent's max_message_bytes"
            )
            assert await agent.health.Check(health_pb2.HealthCheckRequest())  # still serving

    run(scenario())
