"""The agent's gRPC server: services, health, bearer-token auth, TLS, message limits.

`create_server` builds and binds the server without starting it, so tests (and the embedded local
agent) can bind port 0 and learn the port. With a `Serving`, the same server also carries model
serving: `mle.v1.Models` and the Open Inference Protocol's `inference.GRPCInferenceService`.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # public as health.aio; the stubs lack it

from mle_agent.identity import NOT_OPERATOR_MESSAGE, is_operator
from mle_agent.servicers import AgentServicer, ArtifactsServicer
from mle_agent.serving.oip_grpc import InferenceServicer
from mle_agent.serving.servicer import ModelsServicer
from mle_agent.settings import AgentSettings, check_listen_security, split_listen
from mle_agent.tasks import TaskManager
from mle_proto import AUTH_METADATA_KEY
from mle_proto.errors import MleError, UsageError
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from mle_proto.v1 import inference_pb2_grpc as ipb_grpc

if TYPE_CHECKING:
    from mle_agent.serving.registry import ModelRegistry

__all__ = [
    "SERVICE_NAMES",
    "SERVING_SERVICE_NAMES",
    "UNAUTHENTICATED_MESSAGE",
    "Serving",
    "create_server",
    "read_token",
]

log = logging.getLogger(__name__)

SERVICE_NAMES = ("mle.v1.Agent", "mle.v1.Artifacts")
SERVING_SERVICE_NAMES = ("mle.v1.Models", "inference.GRPCInferenceService")
UNAUTHENTICATED_MESSAGE = "missing or wrong token"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass(frozen=True)
class Serving:
    """What the agent serves models with: the registry, the inference threads, the REST port."""

    registry: ModelRegistry
    executor: Executor  # runs inference for the gRPC and REST front-ends
    http_port: int = 0  # the REST listener's port, reported by GetInfo; 0 = no listener


async def create_server(
    settings: AgentSettings, manager: TaskManager, serving: Serving | None = None
) -> tuple[grpc.aio.Server, int]:
    """Build the server with every service registered and bind it; return it and its port."""
    check_listen_security(settings)
    token = read_token(settings.token_file) if settings.token_file else None
    credentials = _server_credentials(settings) if settings.tls else None
    host, port = split_listen(settings.listen)
    if port:
        _probe(host, port, settings.listen)
    interceptors: list[grpc.aio.ServerInterceptor] = []  # type: ignore[type-arg]
    if credentials is not None:  # outermost: a caller that is not the operator learns nothing
        interceptors.append(_OperatorOnly())
    if token:
        interceptors.append(_TokenAuth(token))
    server = grpc.aio.server(interceptors=interceptors, options=_options(settings))
    http_port = serving.http_port if serving else 0
    pb_grpc.add_AgentServicer_to_server(AgentServicer(manager, http_port), server)
    pb_grpc.add_ArtifactsServicer_to_server(ArtifactsServicer(manager.store), server)
    services: tuple[str, ...] = SERVICE_NAMES
    if serving is not None:
        _add_serving(server, serving)
        services += SERVING_SERVICE_NAMES
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in ("", *services):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    manager.on_drain(health.enter_graceful_shutdown)
    return server, _bind(server, settings.listen, credentials)


def read_token(path: Path) -> str:
    """The bearer token in a file (surrounding whitespace ignored); raise UsageError if unusable."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read token file {path}: {reason}") from None
    if not token:
        raise UsageError(f"token file {path} is empty")
    if path.stat().st_mode & 0o077:
        log.warning("token file %s is readable by other users; chmod 600 it", path)
    return token


def _add_serving(server: grpc.aio.Server, serving: Serving) -> None:
    pb_grpc.add_ModelsServicer_to_server(ModelsServicer(serving.registry), server)
    inference = InferenceServicer(serving.registry, serving.executor)
    ipb_grpc.add_GRPCInferenceServiceServicer_to_server(inference, server)


def _options(settings: AgentSettings) -> list[tuple[str, Any]]:
    limit = settings.max_message_bytes
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a second agent on a busy port must fail, not share it
    ]


def _server_credentials(settings: AgentSettings) -> grpc.ServerCredentials:
    def read(path: Path | None) -> bytes:
        assert path is not None  # settings validation requires all three
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read TLS file {path}: {exc.strerror}") from None

    return grpc.ssl_server_credentials(
        [(read(settings.tls_key), read(settings.tls_cert))],
        root_certificates=read(settings.tls_ca),
        require_client_auth=True,
    )


def _probe(host: str, port: int, listen: str) -> None:
    """Bind the address ourselves first: grpc's own failure is a multi-line C++ log."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror}") from None
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                reason = (exc.strerror or str(exc)).lower()
                raise MleError(f"cannot listen on {listen}: {reason}") from None


def _bind(server: grpc.aio.Server, listen: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError:
        port = 0
    if not port:
        raise MleError(f"cannot listen on {listen}: the address cannot be bound")
    return port


class _TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Every call, health checks included, must carry `authorization: Bearer <token>`."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """Pass authorized calls on; answer the others UNAUTHENTICATED."""
        handler = await continuation(handler_call_details)
        if handler is None or self._authorized(handler_call_details):
            return handler
        return _denied(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == AUTH_METADATA_KEY:
                given = value if isinstance(value, bytes) else str(value).encode()
                return hmac.compare_digest(given, self._expected)
        return False


async def _deny(request: object, context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _denied(handler: Handler) -> Handler:
    """A handler of the same shape as `handler` that only refuses."""
    return _reshaped(handler, _deny)


# A handler's shape (request streaming, response streaming): its behaviour attribute and maker.
_SHAPES: dict[tuple[bool, bool], tuple[str, Callable[..., Handler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def _shape(handler: Handler) -> tuple[str, Callable[..., Handler]]:
    return _SHAPES[(handler.request_streaming, handler.response_streaming)]


def _reshaped(handler: Handler, behavior: Callable[..., Any]) -> Handler:
    """A handler of the same shape and (de)serializers as `handler`, doing `behavior`."""
    make = _shape(handler)[1]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _OperatorOnly(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Under mutual TLS, every call, health checks included, must come from the operator's
    certificate: any agent's certificate is from the project CA too, and must not run tasks on
    another agent."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        """The handler, behind a check of the caller's certificate (known only inside a call)."""
        handler = await continuation(handler_call_details)
        return handler if handler is None else _guarded(handler)


def peer_is_operator(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call's verified client certificate is the operator's."""
    names = context.auth_context().get("x509_common_name", [])
    return is_operator([n.decode("utf-8", "replace") for n in names])


async def _require_operator(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if not peer_is_operator(context):
        log.warning("refused a call from %s: not the operator's certificate", context.peer())
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, NOT_OPERATOR_MESSAGE)


def _guarded(handler: Handler) -> Handler:
    """A handler of the same shape as `handler` that checks the caller first."""
    behavior: Callable[..., Any] = getattr(handler, _shape(handler)[0])
    guarded: Callable[..., Any]
    if inspect.isasyncgenfunction(behavior):  # a response stream yielded, not written

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _require_operator(context)
            async for item in behavior(request, context):
                yield item

    else:

        async def guarded(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await _require_operator(context)
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    return _reshaped(handler, guarded)
