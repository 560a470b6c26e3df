"""The `mle.v1.Models` gRPC servicer: deploy, route, undeploy, list.

Deploy, route and undeploy block for seconds (a deploy loads a model in a child process), so
they run in the registry's own admin pool: however many are queued, they never take the threads
that health, metadata or inference need. List only reads the registry under its lock for a
moment, so it runs on the event loop. Errors become gRPC statuses in `servicers._unary`, the
agent's one place for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from mle_agent.servicers import Context, _unary
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from mle_agent.serving.registry import ModelRegistry

__all__ = ["ModelsServicer"]

_Request = TypeVar("_Request")
_Answer = TypeVar("_Answer")


class ModelsServicer(pb_grpc.ModelsServicer):
    """Models served by this agent: versions, routes, live stats."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    @_unary
    async def Deploy(self, request: pb.DeployRequest, context: Context) -> pb.DeployResponse:
        """Validate, check-load, load and switch to a model file already in the store."""
        return await self._admin(self._registry.deploy, request)

    @_unary
    async def Route(self, request: pb.RouteRequest, context: Context) -> pb.ModelStatus:
        """Change a model's route, or roll it back."""
        return await self._admin(self._registry.route, request)

    @_unary
    async def Undeploy(self, request: pb.UndeployRequest, context: Context) -> pb.ModelStatus:
        """Remove a version, or the whole model with version 0."""
        return await self._admin(self._registry.undeploy, request)

    @_unary
    async def List(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        """Models with versions, routes and stats."""
        return pb.ListModelsResponse(models=self._registry.status(request.name))

    async def _admin(self, call: Callable[[_Request], _Answer], request: _Request) -> _Answer:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._registry.admin, call, request)
