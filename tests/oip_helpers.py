"""An in-process agent that serves models, as the daemon wires it: registry, inference threads,
the gRPC services (Agent, Artifacts, Models, OIP inference) and the OIP REST listener.

pytest-asyncio is not a dependency: tests run scenarios with `tests.agent_helpers.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from mle_agent.server import Serving, create_server
from mle_agent.serving.httpd import READ_TIMEOUT, HttpServer
from mle_agent.serving.oip_http import start_http
from mle_agent.serving.registry import ModelRegistry
from mle_agent.settings import AgentSettings
from mle_agent.tasks import TaskManager
from mle_proto import AUTH_METADATA_KEY
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from mle_proto.v1 import inference_pb2_grpc as ipb_grpc
from tests.agent_helpers import REPO, digest_of, put_chunks

MODELS = REPO / "tests" / "fixtures" / "models"


@dataclass
class ServingAgent:
    """An in-process agent with model serving, and clients for it."""

    settings: AgentSettings
    registry: ModelRegistry
    port: int
    http_port: int
    channel: grpc.aio.Channel
    httpd: HttpServer | None = None
    token: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    inference: Any = field(init=False)
    models: Any = field(init=False)
    agent: Any = field(init=False)
    artifacts: Any = field(init=False)

    def __post_init__(self) -> None:
        self.inference = ipb_grpc.GRPCInferenceServiceStub(self.channel)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.agent = pb_grpc.AgentStub(self.channel)
        self.artifacts = pb_grpc.ArtifactsStub(self.channel)

    async def deploy(self, filename: str, name: str = "digits", **fields: Any) -> pb.DeployResponse:
        """Upload a fixture model through Artifacts.Put and deploy it through Models.Deploy."""
        data = (MODELS / filename).read_bytes()
        await self.artifacts.Put(put_chunks(data, 1 << 20), metadata=self.metadata, timeout=60)
        request = pb.DeployRequest(name=name, digest=digest_of(data), filename=filename, **fields)
        response: pb.DeployResponse = await self.models.Deploy(
            request, metadata=self.metadata, timeout=120
        )
        return response

    def auth_headers(self) -> dict[str, str]:
        """The REST Authorization header, when the agent has a token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def http(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """One REST request on a fresh connection: status, headers (lower-case), body."""
        sent = {**self.auth_headers(), **(headers or {})}
        return await asyncio.to_thread(http_request, self.http_port, method, path, body, sent)


def http_request(
    port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A blocking http.client request to 127.0.0.1:port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def serving_agent(
    settings: AgentSettings, token: str | None = None, http_timeout: float = READ_TIMEOUT
) -> AsyncIterator[ServingAgent]:
    """Start a serving agent in this event loop; stop and close everything afterwards."""
    if token is not None:
        token_file = settings.data_dir.parent / "token"
        token_file.parent.mkdir(parents=True, exist_ok=True)
        token_file.write_text(token)
        token_file.chmod(0o600)
        settings = replace(settings, token_file=token_file)
    manager = TaskManager.open(settings)
    registry = ModelRegistry(settings, manager.store)
    executor = ThreadPoolExecutor(settings.infer_workers, thread_name_prefix="test-infer")
    server: grpc.aio.Server | None = None
    httpd: HttpServer | None = None
    try:
        await asyncio.to_thread(registry.start)
        httpd = await start_http(settings, registry, executor, timeout=http_timeout)
        http_port = httpd.port if httpd else 0
        server, port = await create_server(
            settings, manager, Serving(registry, executor, http_port)
        )
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            metadata = ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else ()
            yield ServingAgent(settings, registry, port, http_port, channel, httpd, token, metadata)
    finally:
        await manager.drain(0)
        if httpd is not None:
            await httpd.close()
        if server is not None:
            await server.stop(None)
        executor.shutdown(wait=True, cancel_futures=True)
        registry.close()
        manager.close()
