"""One agent's Models and inference services over gRPC; grpc errors become mle errors here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc
import grpc.aio

from mle_cli.targets import Endpoint
from mle_cli.targets._trust import check_agent_identity
from mle_cli.targets.connection import open_channel
from mle_proto import AUTH_METADATA_KEY, PROTO_VERSION
from mle_proto.errors import FailedPrecondition, from_rpc_error
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as rpc
from mle_proto.v1 import inference_pb2 as oip
from mle_proto.v1 import inference_pb2_grpc as oip_rpc

__all__ = ["DEPLOY_TIMEOUT", "ModelsClient", "open_client"]

T = TypeVar("T")
# A deploy validates, check-loads in a child process, loads and warms up: the agent bounds that
# with its own load_check_timeout; this only guards against an agent that never answers.
DEPLOY_TIMEOUT = 900.0
# Inference requests carry tensors: allow more than control messages. The agent enforces its own
# limit and answers RESOURCE_EXHAUSTED beyond it.
_MAX_MESSAGE = 256 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.use_local_subchannel_pool", 1),
]


class ModelsClient:
    """Calls to one agent's Models and GRPCInferenceService."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        self.target = endpoint.name
        self.agent = endpoint.name  # replaced by the agent's own name once connected
        self._timeout = timeout
        self._metadata = (
            ((AUTH_METADATA_KEY, f"Bearer {endpoint.token}"),) if endpoint.token else ()
        )
        self._endpoint = endpoint
        self._channel = open_channel(endpoint, _CHANNEL_OPTIONS)
        self._agent = rpc.AgentStub(self._channel)
        self._models = rpc.ModelsStub(self._channel)
        self._inference = oip_rpc.GRPCInferenceServiceStub(self._channel)

    async def check(self) -> None:
        """Ask the agent who it is (over mutual TLS, its identity is checked first); refuse one
        that speaks another protocol version."""
        if self._endpoint.tls is not None:
            await check_agent_identity(self._endpoint, self._timeout)
        info = await self._call(
            lambda: self._agent.GetInfo(
                pb.GetInfoRequest(), metadata=self._metadata, timeout=self._timeout
            )
        )
        if info.proto_version != PROTO_VERSION:
            raise FailedPrecondition(
                f"agent {self.target} speaks protocol {info.proto_version or 'unknown'}, "
                f"this mle speaks {PROTO_VERSION}; upgrade the agent"
            )
        self.agent = info.name or self.target

    async def deploy(self, request: pb.DeployRequest) -> pb.DeployResponse:
        """Models.Deploy: validate, load, warm up and switch."""
        return await self._call(
            lambda: self._models.Deploy(request, metadata=self._metadata, timeout=DEPLOY_TIMEOUT)
        )

    async def route(self, request: pb.RouteRequest) -> pb.ModelStatus:
        """Models.Route: a new route or a rollback."""
        return await self._call(
            lambda: self._models.Route(request, metadata=self._metadata, timeout=DEPLOY_TIMEOUT)
        )

    async def undeploy(self, request: pb.UndeployRequest) -> pb.ModelStatus:
        """Models.Undeploy: one version, or (version 0) the whole model."""
        return await self._call(
            lambda: self._models.Undeploy(request, metadata=self._metadata, timeout=DEPLOY_TIMEOUT)
        )

    async def models(self, name: str = "") -> list[pb.ModelStatus]:
        """Models.List: one model or all of them."""
        reply = await self._call(
            lambda: self._models.List(
                pb.ListModelsRequest(name=name), metadata=self._metadata, timeout=self._timeout
            )
        )
        return list(reply.models)

    async def metadata(self, name: str, version: str = "") -> oip.ModelMetadataResponse:
        """OIP ModelMetadata: the inputs and outputs a model (version) takes and gives."""
        request = oip.ModelMetadataRequest(name=name, version=version)
        return await self._call(
            lambda: self._inference.ModelMetadata(
                request, metadata=self._metadata, timeout=self._timeout
            )
        )

    async def infer(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        """OIP ModelInfer."""
        return await self._call(
            lambda: self._inference.ModelInfer(
                request, metadata=self._metadata, timeout=self._timeout
            )
        )

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close(None)

    async def _call(self, make: Callable[[], Awaitable[T]]) -> T:
        try:
            return await make()
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise FailedPrecondition(
                    f"agent {self.target} does not serve models; upgrade it"
                ) from None
            raise from_rpc_error(e, agent=self.target) from None


@asynccontextmanager
async def open_client(endpoint: Endpoint, timeout: float) -> AsyncIterator[ModelsClient]:
    """A checked client for the duration of a block."""
    client = ModelsClient(endpoint, timeout)
    try:
        await client.check()
        yield client
    finally:
        await client.close()
