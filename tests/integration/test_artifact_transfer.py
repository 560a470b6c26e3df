"""Artifacts moved between two real agents the way the scheduler moves a step's outputs to the
next step's agent: `AgentConnection.fetch` into the operator's store, then `ship`. Agent B sits
behind a TCP proxy that counts the bytes sent to it, so "nothing is sent twice" is measured on
the wire."""

from __future__ import annotations

import asyncio
import contextlib
import platform
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mle_cli.executor import TaskRequest
from mle_cli.targets._endpoint import Endpoint
from mle_cli.targets.connection import AgentConnection, connect
from mle_proto.store import ArtifactStore, file_digest, tune_allocator
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import Agent, agent_settings, leak_check, run, running_agent

pytestmark = pytest.mark.timeout(90)
MiB = 1024 * 1024
SIZE = 6 * MiB + 123  # several chunks and a partial one
TOKEN = "transfer-test-token"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


class CountingProxy:
    """A TCP proxy on 127.0.0.1 in front of an agent, counting the bytes sent to the agent."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.sent = 0
        self._handlers: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Listen while the block runs; yield the port. Waits for every connection to end."""
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()
            await asyncio.wait_for(asyncio.gather(*self._handlers), 20)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pump(reader, up_writer, count=True), self._pump(up_reader, writer, count=False)
        )

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, count: bool
    ) -> None:
        try:
            while data := await source.read(256 * 1024):
                if count:
                    self.sent += len(data)
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()
            with contextlib.suppress(ConnectionError):
                await sink.wait_closed()


async def _produce(conn: AgentConnection, size: int) -> str:
    """A step on the agent writes `size` random bytes as its output; its digest."""
    request = TaskRequest(
        task_id="r1.produce.1", run_id="r1", step="produce", attempt=1, argv=None, env={},
        shell=f"head -c {size} /dev/urandom > blob.bin", inputs={}, outputs=("blob.bin",),
        timeout=60,
    )  # fmt: skip
    await conn.start(request)
    updates = [u async for u in conn.watch(request.task_id, 0)]
    result = updates[-1]
    assert (result.kind, result.state) == ("result", "succeeded"), result
    assert [(o.path, o.size) for o in result.outputs] == [("blob.bin", size)]
    return result.outputs[0].digest


def _endpoint(name: str, port: int) -> Endpoint:
    return Endpoint(name=name, address=f"127.0.0.1:{port}", token=TOKEN)


@contextlib.asynccontextmanager
async def _two_agents(tmp_path: Path) -> AsyncIterator[tuple[Agent, Agent]]:
    async with (
        running_agent(agent_settings(tmp_path / "a", name="agent-a"), token=TOKEN) as a,
        running_agent(agent_settings(tmp_path / "b", name="agent-b"), token=TOKEN) as b,
    ):
        yield a, b


async def _b_holds(b: Agent, digest: str) -> bytes:
    stat = await b.artifacts.Stat(pb.StatRequest(digests=[digest]), metadata=b.metadata)
    assert [(s.present, s.size) for s in stat.artifacts] == [(True, SIZE)]
    chunks = await b.get(digest)
    return b"".join(c.data for c in chunks)


def test_an_output_moves_from_agent_to_agent_through_the_operator_store(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "operator")

    async def scenario() -> None:
        async with _two_agents(tmp_path) as (a, b):
            conn_a = await connect(_endpoint("agent-a", a.port), 30)
            conn_b = await connect(_endpoint("agent-b", b.port), 30)
            try:
                digest = await _produce(conn_a, SIZE)
                await conn_a.fetch([digest], store)
                assert file_digest(store.path_of(digest)) == (digest, SIZE)
                assert await conn_b.missing([digest]) == [digest]
                await conn_b.ship([digest], store)
                assert await conn_b.missing([digest]) == []
                assert await _b_holds(b, digest) == store.path_of(digest).read_bytes()
            finally:
                await conn_a.close()
                await conn_b.close()

    run(scenario())


def test_a_second_ship_of_the_same_digest_sends_nothing(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "operator")

    async def scenario() -> None:
        async with _two_agents(tmp_path) as (a, b):
            conn_a = await connect(_endpoint("agent-a", a.port), 30)
            try:
                digest = await _produce(conn_a, SIZE)
                await conn_a.fetch([digest], store)
            finally:
                await conn_a.close()
            proxy = CountingProxy(b.port)
            async with proxy.serving() as port:
                sent = [await _ship(_endpoint("agent-b", port), digest, store, proxy)]
                stored = b.settings.artifacts_root / "sha256" / digest[7:9] / digest[7:]
                first = stored.stat()
                # A new connection (a later run, another scheduler): it asks, B has it.
                sent.append(await _ship(_endpoint("agent-b", port), digest, store, proxy))
            assert sent[0] >= SIZE  # the first ship carried the artifact
            assert sent[1] < 64 * 1024, sent  # the second only a handshake, GetInfo and Stat
            again = stored.stat()
            assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
            assert await _b_holds(b, digest) == store.path_of(digest).read_bytes()

    run(scenario())


async def _ship(endpoint: Endpoint, digest: str, store: ArtifactStore, proxy: CountingProxy) -> int:
    """Ship on a new connection, twice (the second time it already knows); bytes sent to B."""
    before = proxy.sent
    conn = await connect(endpoint, 30)
    try:
        await conn.ship([digest], store)
        known = proxy.sent
        await conn.ship([digest], store)  # confirmed on this connection: not even asked
        assert proxy.sent - known < 1024
    finally:
        await conn.close()
    return proxy.sent - before


@pytest.mark.parametrize("variable", ["MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_the_allocator_is_left_alone_when_the_environment_tunes_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "glibc.malloc.trim_threshold=1048576")
    assert tune_allocator.__wrapped__() is False


def test_the_allocator_is_tuned_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"mallopt is glibc's; this is {platform.libc_ver()[0] or 'another libc'}")
    for variable in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(variable, raising=False)
    assert tune_allocator.__wrapped__() is True
