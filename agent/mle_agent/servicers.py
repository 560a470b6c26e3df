"""The gRPC servicers: `mle.v1.Agent` and `mle.v1.Artifacts`.

Handlers raise the shared `mle_proto.errors` tree; `_unary`/`_streaming` are the one place that
turns an exception into a gRPC status (unexpected ones become INTERNAL, traceback in the log).
"""

from __future__ import annotations

import errno
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
import psutil

from mle_agent.facts import agent_info
from mle_agent.heartbeat import heartbeat_interval
from mle_agent.tasks import TaskManager
from mle_proto.errors import InvalidInput, MleError, NotFound, ResourceExhausted
from mle_proto.store import CHUNK, ArtifactStore, parse_digest, tune_allocator
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc

__all__ = ["AgentServicer", "ArtifactsServicer"]

log = logging.getLogger(__name__)

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _unary(
    method: Callable[[_S, _Req, Context], Awaitable[_Resp]],
) -> Callable[[_S, _Req, Context], Coroutine[Any, Any, _Resp]]:
    """Map exceptions of a unary handler to gRPC statuses."""

    @functools.wraps(method)
    async def handler(self: _S, request: _Req, context: Context) -> _Resp:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
            await _abort(context, exc)

    return handler


def _streaming(
    method: Callable[[_S, _Req, Context], AsyncIterator[_Resp]],
) -> Callable[[_S, _Req, Context], AsyncIterator[_Resp]]:
    """Map exceptions of a response-streaming handler to gRPC statuses."""

    @functools.wraps(method)
    async def handler(self: _S, request: _Req, context: Context) -> AsyncIterator[_Resp]:
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - the one place errors become statuses
            await _abort(context, exc)

    return handler


async def _abort(context: Context, exc: Exception) -> NoReturn:
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, message = _status_of(exc)
    await context.abort(code, message)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, MleError):
        return grpc.StatusCode[exc.status], exc.message
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the agent's disk is full"
    if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the agent's disk is full"
    log.error("internal error in an RPC handler", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal error: see agent log"


class AgentServicer(pb_grpc.AgentServicer):
    """Tasks: start, watch, cancel, list, ack; the agent's facts and heartbeats."""

    def __init__(self, manager: TaskManager, http_port: int = 0) -> None:
        self._manager = manager
        self._http_port = http_port

    @_unary
    async def GetInfo(self, request: pb.GetInfoRequest, context: Context) -> pb.AgentInfo:
        """Facts about the agent."""
        manager = self._manager
        return agent_info(
            manager.settings,
            boot_id=manager.boot_id,
            running_tasks=manager.running_count,
            http_port=self._http_port,
        )

    @_unary
    async def StartTask(self, request: pb.TaskSpec, context: Context) -> pb.TaskHandle:
        """Accept a task; idempotent on task_id."""
        return await self._manager.start(request)

    @_streaming
    async def WatchTask(
        self, request: pb.WatchTaskRequest, context: Context
    ) -> AsyncIterator[pb.TaskEvent]:
        """Replay, then follow, a task's events."""
        async for event in self._manager.watch(request.task_id, request.after_seq):
            yield event

    @_streaming
    async def RunTask(self, request: pb.TaskSpec, context: Context) -> AsyncIterator[pb.TaskEvent]:
        """Accept a task (idempotent on task_id), then replay and follow its events."""
        await self._manager.start(request)
        async for event in self._manager.watch(request.task_id, 0):
            yield event

    @_unary
    async def CancelTask(self, request: pb.CancelTaskRequest, context: Context) -> pb.TaskHandle:
        """Cancel a task and kill its process tree."""
        return await self._manager.cancel(request.task_id, request.reason)

    @_unary
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        """Tasks the agent knows."""
        return pb.ListTasksResponse(tasks=self._manager.list_tasks(request.run_id))

    @_unary
    async def Ack(self, request: pb.AckRequest, context: Context) -> pb.AckResponse:
        """Record the operator's acks and prune what they cover."""
        more = [(a.task_id, a.upto_seq) for a in request.more]
        return pb.AckResponse(acked_seq=self._manager.ack(request.task_id, request.upto_seq, more))

    @_streaming
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> AsyncIterator[pb.AgentHeartbeat]:
        """Liveness and load: one heartbeat at once, then one every interval until drain."""
        default = self._manager.settings.heartbeat_interval
        interval = heartbeat_interval(request.interval_seconds, default)
        async for beat in self._manager.heartbeats(interval):
            yield beat


class ArtifactsServicer(pb_grpc.ArtifactsServicer):
    """The content-addressed store over gRPC: stat, chunked upload, resumable download."""

    def __init__(self, store: ArtifactStore) -> None:
        self._store = store
        tune_allocator()  # transfers go through MiB-sized buffers: see mle_proto.store

    @_unary
    async def Stat(self, request: pb.StatRequest, context: Context) -> pb.StatResponse:
        """Presence and size of each digest."""
        stats = []
        for digest in request.digests:
            size = self._store.size(digest)
            stats.append(pb.ArtifactStat(digest=digest, present=size is not None, size=size or 0))
        return pb.StatResponse(artifacts=stats)

    @_unary
    async def Put(
        self, request_iterator: AsyncIterator[pb.PutChunk], context: Context
    ) -> pb.PutResponse:
        """Receive an artifact; it becomes visible only once digest and size are verified."""
        chunks = aiter(request_iterator)
        first = await anext(chunks, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidInput("Put must start with a header chunk (digest and size)")
        header = first.header
        parse_digest(header.digest)
        size = self._store.size(header.digest)
        if size is not None:
            async for _ in chunks:  # drain what the client already sent
                pass
            return pb.PutResponse(digest=header.digest, size=size, existed=True)
        self._check_space(header.size)
        digest, size = await self._receive(chunks, header)
        return pb.PutResponse(digest=digest, size=size, existed=False)

    @_streaming
    async def Get(self, request: pb.GetRequest, context: Context) -> AsyncIterator[pb.GetChunk]:
        """Stream an artifact from offset in chunks of at most 1 MiB; size on the first chunk."""
        size = self._store.size(request.digest)
        if size is None:
            raise NotFound(f"artifact {request.digest} is not on this agent")
        if request.offset > size:
            raise InvalidInput(f"offset {request.offset} is beyond the artifact's size {size}")
        with self._store.open(request.digest) as f:
            f.seek(request.offset)
            chunk = f.read(CHUNK)
            yield pb.GetChunk(data=chunk, size=size)  # even when empty: the client learns the size
            while chunk := f.read(CHUNK):
                yield pb.GetChunk(data=chunk)

    async def _receive(
        self, chunks: AsyncIterator[pb.PutChunk], header: pb.PutHeader
    ) -> tuple[str, int]:
        with self._store.writer(header.digest) as pending:
            async for chunk in chunks:
                if chunk.WhichOneof("part") != "data":
                    raise InvalidInput("Put: only the first chunk may carry a header")
                pending.write(chunk.data)
                if pending.size > header.size:
                    raise InvalidInput(
                        f"size mismatch: header says {header.size} bytes, received more"
                    )
            if pending.size != header.size:
                raise InvalidInput(
                    f"size mismatch: header says {header.size} bytes, received {pending.size}"
                )
            return pending.commit()

    def _check_space(self, size: int) -> None:
        try:
            free = psutil.disk_usage(str(self._store.root)).free
        except OSError:
            return
        if size > free:
            raise ResourceExhausted(
                f"not enough disk space on the agent: {size} bytes needed, {free} free"
            )
