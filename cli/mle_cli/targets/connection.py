"""A gRPC connection to one agent, implementing the scheduler's Executor interface.

This is where grpc errors enter the operator side: every call translates `grpc.RpcError` into the
shared exception tree, naming the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import grpc
import grpc.aio

from mle_cli.executor import OutputFile, TaskRequest, TaskUpdate
from mle_cli.targets._endpoint import Endpoint
from mle_cli.targets._trust import check_agent_identity
from mle_proto import AUTH_METADATA_KEY, PROTO_VERSION
from mle_proto.errors import AgentUnavailable, FailedPrecondition, NotFound, from_rpc_error
from mle_proto.store import ArtifactStore, tune_allocator
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as rpc

__all__ = ["AgentConnection", "connect", "open_channel"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_MAX_MESSAGE = 4 * 1024 * 1024
_GET_ATTEMPTS = 4
_PROMISE_SECONDS = 10.0
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    # A connection of its own, not one shared with an earlier channel to the same address that
    # is still backing off after its agent died: a restarted agent is reachable at once.
    ("grpc.use_local_subchannel_pool", 1),
    # A restarted agent is back within a second or two: do not back off for longer than that.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


async def connect(
    endpoint: Endpoint, rpc_timeout: float, heartbeat_interval: float = 0.0
) -> AgentConnection:
    """Open a connection and check the agent speaks our protocol version. With a heartbeat
    interval, the connection follows the agent's heartbeats to tell whether it is alive.
    Over mutual TLS, the agent's identity is checked first (see `_trust`)."""
    if endpoint.tls is not None:
        await check_agent_identity(endpoint, rpc_timeout)
    conn = AgentConnection(endpoint, rpc_timeout)
    try:
        info = await conn.info()
    except BaseException:
        await conn.close()
        raise
    if info.proto_version != PROTO_VERSION:
        await conn.close()
        raise FailedPrecondition(
            f"agent {endpoint.name} speaks protocol {info.proto_version or 'unknown'}, "
            f"this mle speaks {PROTO_VERSION}; upgrade the agent (mle agent upgrade)"
        )
    conn.set_slots(max(1, info.slots))
    conn.platform = platform_class(info.os, info.arch)
    conn.features = frozenset(info.features)
    if heartbeat_interval > 0:
        conn.follow_heartbeats(heartbeat_interval)
    return conn


def platform_class(os_description: str, arch: str) -> str:
    """What a cached result is valid for: the OS family and the machine architecture."""
    family = (os_description.split() or ["unknown"])[0].lower()
    return f"{family}-{arch.lower() or 'unknown'}"


class AgentConnection:
    """Executor over one agent's gRPC endpoint."""

    def __init__(self, endpoint: Endpoint, rpc_timeout: float) -> None:
        self.name = endpoint.name
        self.address = endpoint.address
        self._timeout = rpc_timeout
        self._metadata = (
            ((AUTH_METADATA_KEY, f"Bearer {endpoint.token}"),) if endpoint.token else ()
        )
        self._channel = open_channel(endpoint)
        self._agent = rpc.AgentStub(self._channel)
        self._artifacts = rpc.ArtifactsStub(self._channel)
        self.set_slots(1)
        self.platform = "unknown"
        self.features: frozenset[str] = frozenset()  # AgentInfo.features: what beyond v1 it has
        self.boot_id = ""
        self._present: set[str] = set()  # digests the agent is known to hold
        self._last_seen = time.monotonic()
        self._heartbeats: asyncio.Task[None] | None = None
        self.last_heartbeat: pb.AgentHeartbeat | None = None
        # Called with each heartbeat received (e.g. to record its metrics in the ledger).
        self.on_heartbeat: Callable[[pb.AgentHeartbeat], None] | None = None
        self.on_slot_freed: Callable[[], None] | None = None  # an attempt gave its slot back

    def silent_for(self) -> float:
        """Seconds since the last heartbeat (0 when heartbeats are not followed)."""
        if self._heartbeats is None:
            return 0.0
        return time.monotonic() - self._last_seen

    def follow_heartbeats(self, interval: float) -> None:
        """Keep a heartbeat stream open in the background, reopening it when it breaks."""
        self._last_seen = time.monotonic()
        self._heartbeats = asyncio.create_task(self._follow_heartbeats(interval))

    async def _follow_heartbeats(self, interval: float) -> None:
        request = pb.HeartbeatRequest(interval_seconds=interval)
        while True:
            call = self._agent.Heartbeat(request, metadata=self._metadata)
            try:
                async for beat in call:
                    self._last_seen = time.monotonic()
                    if beat.boot_id != self.boot_id:  # restarted: its store may have changed
                        self._present.clear()
                    self.boot_id = beat.boot_id
                    self.last_heartbeat = beat
                    if self.on_heartbeat is not None:
                        self.on_heartbeat(beat)
            except grpc.RpcError as e:
                log.debug("heartbeats from %s broke: %s", self.name, e.code())
            finally:
                call.cancel()
            await asyncio.sleep(interval / 2)

    def set_slots(self, slots: int) -> None:
        """How many attempts may run on this agent at once."""
        self.slots = slots
        self.busy = 0  # slots held by attempts
        self._promised: list[float] = []  # when steps placed here were promised a slot
        self._slots = asyncio.Semaphore(slots)

    def slot(self) -> AbstractAsyncContextManager[None]:
        """Held while an attempt runs."""
        return _Slot(self)

    def promise(self) -> None:
        """Count a slot as taken by a step just placed here, until its attempt holds one."""
        self._promised.append(time.monotonic())

    def free_slots(self) -> int:
        """Slots neither held by an attempt nor promised to a step about to start one (a promise
        lapses after a while: a step may end without running, e.g. from the cache)."""
        now = time.monotonic()
        self._promised = [t for t in self._promised if now - t < _PROMISE_SECONDS]
        return self.slots - self.busy - len(self._promised)

    def load(self) -> float:
        """The agent's 1-minute load average per slot, from its last heartbeat (0 before one)."""
        beat = self.last_heartbeat
        return beat.load1 / max(1, self.slots) if beat is not None else 0.0

    async def info(self) -> pb.AgentInfo:
        """The agent's facts."""
        return await self._call(
            lambda: self._agent.GetInfo(
                pb.GetInfoRequest(), metadata=self._metadata, timeout=self._timeout
            )
        )

    async def start(self, request: TaskRequest) -> None:
        """Start a task; a repeated call for the same task id is harmless."""
        spec = _task_spec(request)
        await self._call(
            lambda: self._agent.StartTask(spec, metadata=self._metadata, timeout=self._timeout)
        )

    def run(self, request: TaskRequest) -> AsyncIterator[TaskUpdate]:
        """Start a task and stream its events from the first until its result: in one call, or
        as StartTask then WatchTask on an agent without RunTask."""
        if "run-task" in self.features:
            return self._events(self._agent.RunTask(_task_spec(request), metadata=self._metadata))
        return self._start_and_watch(request)

    async def _start_and_watch(self, request: TaskRequest) -> AsyncIterator[TaskUpdate]:
        await self.start(request)
        async for update in self.watch(request.task_id, 0):
            yield update

    def watch(self, task_id: str, after_seq: int) -> AsyncIterator[TaskUpdate]:
        """Stream the task's events after after_seq until its result."""
        request = pb.WatchTaskRequest(task_id=task_id, after_seq=after_seq)
        return self._events(self._agent.WatchTask(request, metadata=self._metadata))

    async def _events(self, call: Any) -> AsyncIterator[TaskUpdate]:
        try:
            async for event in call:
                yield _task_update(event)
        except grpc.RpcError as e:
            raise from_rpc_error(e, agent=self.name) from None
        finally:
            call.cancel()

    async def cancel(self, task_id: str, reason: str) -> None:
        """Kill a task's process tree."""
        request = pb.CancelTaskRequest(task_id=task_id, reason=reason)
        await self._call(
            lambda: self._agent.CancelTask(request, metadata=self._metadata, timeout=self._timeout)
        )

    async def ack(self, acks: Mapping[str, int]) -> None:
        """Let the agent prune events the ledger holds: for several tasks in one call, or one
        call per task on an agent without batched acks."""
        if "ack-batch" not in self.features:
            for task_id, upto_seq in acks.items():
                with contextlib.suppress(NotFound):  # gone from the agent: nothing to prune
                    await self._ack(pb.AckRequest(task_id=task_id, upto_seq=upto_seq))
            return
        (task_id, upto_seq), *more = acks.items()
        more_acks = [pb.TaskAck(task_id=t, upto_seq=s) for t, s in more]
        await self._ack(pb.AckRequest(task_id=task_id, upto_seq=upto_seq, more=more_acks))

    async def _ack(self, request: pb.AckRequest) -> None:
        await self._call(
            lambda: self._agent.Ack(request, metadata=self._metadata, timeout=self._timeout)
        )

    async def missing(self, digests: Iterable[str]) -> list[str]:
        """Which of these artifacts the agent lacks."""
        wanted = sorted(set(digests))
        if not wanted:
            return []
        request = pb.StatRequest(digests=wanted)
        reply = await self._call(
            lambda: self._artifacts.Stat(request, metadata=self._metadata, timeout=self._timeout)
        )
        return [a.digest for a in reply.artifacts if not a.present]

    async def ship(self, digests: Iterable[str], store: ArtifactStore) -> None:
        """Upload the artifacts the agent lacks (dedup by digest). Digests the agent already
        confirmed are not asked about again until it restarts (a new boot id)."""
        wanted = [d for d in set(digests) if d not in self._present]
        for digest in await self.missing(wanted):
            size = store.size(digest) or 0
            await self._call(lambda d=digest, s=size: self._put(d, s, store))  # type: ignore[misc]
        self._present.update(wanted)

    async def fetch(self, digests: Iterable[str], store: ArtifactStore) -> None:
        """Download artifacts the local store lacks."""
        for digest in sorted(set(digests)):
            if not store.has(digest):
                await self._get(digest, store)

    def stop_heartbeats(self) -> None:
        """Stop following heartbeats (a replaced connection must not record them twice)."""
        self.on_heartbeat = None
        if self._heartbeats is not None:
            self._heartbeats.cancel()

    async def close(self) -> None:
        """Stop following heartbeats and close the channel."""
        self.stop_heartbeats()
        if self._heartbeats is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
        await self._channel.close(None)

    async def _put(self, digest: str, size: int, store: ArtifactStore) -> pb.PutResponse:
        tune_allocator()  # each chunk passes through MiB-sized buffers: see mle_proto.store

        async def chunks() -> AsyncIterator[pb.PutChunk]:
            yield pb.PutChunk(header=pb.PutHeader(digest=digest, size=size))
            for data in store.iter_chunks(digest):
                yield pb.PutChunk(data=data)

        return await self._artifacts.Put(chunks(), metadata=self._metadata)

    async def _get(self, digest: str, store: ArtifactStore) -> None:
        """Download into a pending artifact, resuming from what arrived when the stream breaks."""
        tune_allocator()  # each chunk passes through MiB-sized buffers: see mle_proto.store
        with store.writer(digest) as pending:
            for attempt in range(_GET_ATTEMPTS):
                request = pb.GetRequest(digest=digest, offset=pending.size)
                try:
                    async for chunk in self._artifacts.Get(request, metadata=self._metadata):
                        pending.write(chunk.data)
                    break
                except grpc.RpcError as e:
                    error = from_rpc_error(e, agent=self.name)
                    if not isinstance(error, AgentUnavailable) or attempt == _GET_ATTEMPTS - 1:
                        raise error from None
                    await asyncio.sleep(0.2 * 2**attempt)
            pending.commit()

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except grpc.RpcError as e:
            raise from_rpc_error(e, agent=self.name) from None


def open_channel(
    endpoint: Endpoint, options: list[tuple[str, int]] = _CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """Plain for the loopback agent (it checks a token); mutual TLS when the endpoint has an
    identity, where the agent's certificate must carry its target name (grpc checks the SAN)."""
    if endpoint.tls is None:
        return grpc.aio.insecure_channel(endpoint.address, options=options)
    tls = endpoint.tls
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key or None, tls.cert or None)
    named = [*options, ("grpc.ssl_target_name_override", endpoint.name)]
    return grpc.aio.secure_channel(endpoint.address, credentials, options=named)


class _Slot:
    def __init__(self, conn: AgentConnection) -> None:
        self._conn = conn

    async def __aenter__(self) -> None:
        await self._conn._slots.acquire()
        self._conn.busy += 1
        if self._conn._promised:
            self._conn._promised.pop(0)

    async def __aexit__(self, *exc: object) -> None:
        self._conn.busy -= 1
        self._conn._slots.release()
        if self._conn.on_slot_freed is not None:
            self._conn.on_slot_freed()


def _task_spec(request: TaskRequest) -> pb.TaskSpec:
    spec = pb.TaskSpec(
        task_id=request.task_id,
        run_id=request.run_id,
        step=request.step,
        attempt=request.attempt,
        env=dict(request.env),
        inputs=[pb.InputFile(path=p, digest=d) for p, d in sorted(request.inputs.items())],
        outputs=list(request.outputs),
        timeout_seconds=request.timeout or 0.0,
    )
    if request.argv is not None:
        spec.argv.args.extend(request.argv)
    else:
        spec.shell = request.shell or ""
    return spec


def _state_name(state: int) -> str:
    return pb.TaskState.Name(state).removeprefix("TASK_STATE_").lower().replace("_", "-")  # type: ignore[arg-type]


def _task_update(event: pb.TaskEvent) -> TaskUpdate:
    body = event.WhichOneof("body")
    if body == "log":
        stream = "stderr" if event.log.stream == pb.LOG_STREAM_STDERR else "stdout"
        return TaskUpdate(event.seq, event.time, "log", stream=stream, text=event.log.text)
    if body == "result":
        r = event.result
        outputs = tuple(OutputFile(o.path, o.digest, o.size) for o in r.outputs)
        return TaskUpdate(
            event.seq,
            event.time,
            "result",
            state=_state_name(r.state),
            text=r.message,
            exit_code=r.exit_code,
            outputs=outputs,
        )
    return TaskUpdate(
        event.seq,
        event.time,
        "state",
        state=_state_name(event.state.state),
        text=event.state.message,
    )
