"""The Open Inference Protocol v2 REST routes and `/metrics` of an agent.

    GET  /v2/health/live | /v2/health/ready | /v2 | /metrics
    GET  /v2/models/{name}[/versions/{v}]            model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready      200 ready, 503 not (yet)
    POST /v2/models/{name}[/versions/{v}]/infer      JSON, or JSON + binary tensor data

Infer bodies follow the OIP REST spec plus the binary tensor data extension tritonclient uses by
default: `Inference-Header-Content-Length: N` is the JSON part's length, input tensors with a
`binary_data_size` parameter follow it in order, and outputs asked for with `binary_data` (or all
of them with the request parameter `binary_data_output`) come back the same way. Errors are
`{"error": "..."}` with 400 (bad input), 404 (unknown model, version or route), 409 (no route,
version not loaded or failed), 401, 413, 503 (still loading).

JSON tensor data costs memory: Python builds an object per value, several times the text's size.
So a request's JSON part may hold at most `max_message_bytes / 8` values (413 beyond: send large
tensors as binary data), and JSON parts over 64 KiB are decoded two at a time. Output values
that JSON cannot carry (NaN, Infinity) are written as null, so the body is always valid JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from mle_agent.server import UNAUTHENTICATED_MESSAGE, read_token
from mle_agent.serving.httpd import (
    READ_TIMEOUT,
    HttpError,
    HttpServer,
    Request,
    Response,
    error_response,
    json_response,
    server_ssl_context,
)
from mle_agent.serving.oip_grpc import (
    EXTENSIONS,
    SERVER_NAME,
    ordered_outputs,
    parse_version,
    requested_outputs,
)
from mle_agent.serving.registry import InferRequest
from mle_agent.serving.stats import render_metrics
from mle_agent.serving.tensors import decode_json_inputs, encode_json_outputs
from mle_agent.settings import check_listen_security, split_listen
from mle_proto import __version__
from mle_proto.errors import InvalidInput, MleError, UsageError

if TYPE_CHECKING:
    import ssl

    from mle_agent.serving.backend import TensorSpec
    from mle_agent.serving.registry import ModelMetadata, ModelRegistry
    from mle_agent.settings import AgentSettings

__all__ = [
    "HEADER_CONTENT_LENGTH",
    "OipRoutes",
    "check_http_settings",
    "http_address",
    "start_http",
]

log = logging.getLogger(__name__)

HEADER_CONTENT_LENGTH = "inference-header-content-length"
JSON_DECODES = 2  # large JSON parts decoded at once
_SMALL_JSON = 64 * 1024  # bytes: a JSON part this small decodes without waiting for a slot
_BYTES_PER_VALUE = 8  # the JSON value limit is max_message_bytes / this
# MleError.status (a gRPC code name) -> HTTP status.
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 409,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "CANCELLED": 503,
}  # fmt: skip


def http_address(settings: AgentSettings) -> tuple[str, int] | None:
    """Where REST listens: `http_listen`, else the gRPC host at port + 1 (0 stays 0); None = off."""
    if settings.http_listen is None:
        host, port = split_listen(settings.listen)
        return host, (port + 1 if 0 < port < 65535 else 0)
    if settings.http_listen.strip().lower() == "off":
        return None
    try:
        return split_listen(settings.http_listen)
    except UsageError:
        raise UsageError(
            f"invalid http_listen {settings.http_listen!r}: expected HOST:PORT or off"
        ) from None


def check_http_settings(settings: AgentSettings) -> None:
    """UsageError for a malformed `http_listen`, or a public one without TLS or --insecure."""
    http_address(settings)
    if settings.http_listen is not None and settings.http_listen.strip().lower() != "off":
        check_listen_security(replace(settings, listen=settings.http_listen))


async def start_http(
    settings: AgentSettings,
    registry: ModelRegistry,
    executor: Executor,
    *,
    timeout: float = READ_TIMEOUT,
) -> HttpServer | None:
    """Bind and serve the REST routes as the settings say; None when `http_listen` is off.

    Inference runs in `executor`; a client silent for `timeout` seconds is disconnected.
    """
    check_http_settings(settings)
    address = http_address(settings)
    if address is None:
        return None
    token = read_token(settings.token_file) if settings.token_file else None
    server = HttpServer(
        OipRoutes(registry, executor).answer,
        token=token,
        max_body=settings.max_message_bytes,
        unauthenticated=UNAUTHENTICATED_MESSAGE,
        timeout=timeout,
    )
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_ca
    context = server_ssl_context(cert, key, ca) if cert and key and ca else None
    host, port = address
    try:
        await server.bind(host, port, context)
    except OSError as exc:
        derived = settings.http_listen is None and port
        if not derived or exc.errno != errno.EADDRINUSE:  # another port cannot cure the rest
            raise MleError(f"cannot listen on {host}:{port} for HTTP: {_reason(exc)}") from None
        # The derived default (gRPC port + 1) is only a convention: take any free port instead.
        log.warning("HTTP port %d is taken (%s); using a free port", port, _reason(exc))
        await _bind_any_port(server, host, context)
    return server


async def _bind_any_port(server: HttpServer, host: str, context: ssl.SSLContext | None) -> None:
    """Bind a free port on host, or say in one line why not."""
    try:
        await server.bind(host, 0, context)
    except OSError as exc:
        raise MleError(f"cannot listen on {host} for HTTP: {_reason(exc)}") from None


class OipRoutes:
    """Answers REST requests from the registry: inference in the inference threads; health,
    metadata and metrics on the event loop (they hold the registry lock only for a moment)."""

    def __init__(self, registry: ModelRegistry, executor: Executor) -> None:
        self._registry = registry
        self._executor = executor
        self.max_json_values = max(1, registry.settings.max_message_bytes // _BYTES_PER_VALUE)
        self._decoding = threading.BoundedSemaphore(JSON_DECODES)

    async def answer(self, request: Request) -> Response:
        """The response to one request; errors become JSON error responses."""
        try:
            return await self._route(request)
        except HttpError as exc:
            return error_response(exc.status, exc.message)
        except MleError as exc:
            return error_response(_HTTP_STATUS.get(exc.status, 500), exc.message)
        except Exception:
            log.exception("internal error answering %s %s", request.method, request.path[:200])
            return error_response(500, "internal error: see agent log")

    async def _route(self, request: Request) -> Response:
        segments = [unquote(s) for s in request.path.split("/")[1:]]
        match segments:
            case ["v2", "health", "live"]:
                _method(request, "GET")
                return Response(200)
            case ["v2", "health", "ready"]:
                _method(request, "GET")
                return Response(200 if self._registry.ready() else 503)
            case ["v2"]:
                _method(request, "GET")
                extensions = list(EXTENSIONS)
                return json_response(
                    200,
                    {"name": SERVER_NAME, "version": __version__, "extensions": extensions},
                )
            case ["metrics"]:
                _method(request, "GET")
                # A few ms of counters and psutil reads: on the loop, so a scrape never queues
                # behind work in shared threads (task staging, output hashing).
                return self._metrics()
            case ["v2", "models", name, "versions", version, *rest] if name and version:
                return await self._model(request, name, version, rest)
            case ["v2", "models", name, *rest] if name and rest[:1] != ["versions"]:
                return await self._model(request, name, "", rest)
        raise HttpError(404, f"no route {request.path[:200]}")

    async def _model(self, request: Request, name: str, version: str, rest: list[str]) -> Response:
        number = parse_version(version)
        match rest:
            case []:
                _method(request, "GET")
                return json_response(200, _model_metadata(self._registry.metadata(name, number)))
            case ["ready"]:
                _method(request, "GET")
                return Response(200 if self._registry.ready(name, number) else 503)
            case ["infer"]:
                _method(request, "POST")
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(
                    self._executor, self._infer, name, number, request
                )
        raise HttpError(404, f"no route {request.path[:200]}")

    def _infer(self, name: str, version: int | None, request: Request) -> Response:
        body, inputs = self._decode(request)
        outputs = _output_parameters(body.get("outputs"))
        wanted = requested_outputs(outputs.items())
        request_id = body.get("id", "")
        if not isinstance(request_id, str):
            raise InvalidInput("'id' must be a string")
        result = self._registry.infer(
            InferRequest(name, inputs, version, request_id=request_id, outputs=wanted)
        )
        answer: dict[str, Any] = {"model_name": result.model, "model_version": str(result.version)}
        if request_id:
            answer["id"] = request_id
        if result.parameters:
            answer["parameters"] = dict(result.parameters)
        entries, parts = encode_json_outputs(
            ordered_outputs(result, wanted), _binary_choice(body, outputs)
        )
        answer["outputs"] = entries
        text = json.dumps(answer, allow_nan=False).encode()
        if not parts:
            return Response(200, text)
        header = (("Inference-Header-Content-Length", str(len(text))),)
        return Response(200, b"".join([text, *parts]), "application/octet-stream", header)

    def _decode(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        """The JSON part of an infer body (without its inputs) and the inputs as arrays."""
        size = _json_size(request)
        part = request.body[:size] if size < len(request.body) else request.body
        # An upper bound on the values, counted in C before Python builds an object for each.
        values = part.count(b",") + part.count(b"[")
        if values > self.max_json_values:
            raise HttpError(
                413,
                f"the request's JSON holds more than {self.max_json_values} values, the agent's "
                "limit: send large tensors as binary data (binary_data_size)",
            )
        slot = self._decoding if size > _SMALL_JSON else contextlib.nullcontext()
        with slot:
            body = _object(_parse_json(part), "the request body")
            inputs = decode_json_inputs(body.pop("inputs", None), memoryview(request.body)[size:])
        return body, inputs

    def _metrics(self) -> Response:
        body, content_type = render_metrics(self._registry)
        return Response(200, body, content_type)


def _json_size(request: Request) -> int:
    """The length of an infer body's JSON part: Inference-Header-Content-Length, else all."""
    size_text = request.headers.get(HEADER_CONTENT_LENGTH)
    if size_text is None:
        return len(request.body)
    digits = size_text.lstrip("0") or "0"
    # Length first: int() refuses over 4300 digits.
    if (
        not size_text.isascii()
        or not size_text.isdigit()
        or len(digits) > len(str(len(request.body)))
        or int(digits) > len(request.body)
    ):
        raise InvalidInput(f"invalid Inference-Header-Content-Length {size_text[:40]!r}")
    return int(digits)


def _parse_json(part: bytes) -> Any:
    try:
        return json.loads(part)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits
        reason = str(exc).splitlines()[0][:200]
        raise InvalidInput(f"request body is not valid JSON: {reason}") from None
    except RecursionError:
        raise InvalidInput("request body is not valid JSON: nested too deeply") from None


def _output_parameters(outputs: Any) -> dict[str, dict[str, Any]]:
    """Requested outputs, name -> parameters, in request order."""
    if outputs is None:
        return {}
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    found: dict[str, dict[str, Any]] = {}
    for entry in outputs:
        name = _object(entry, "each requested output").get("name")
        if not isinstance(name, str) or not name:
            raise InvalidInput("a requested output has no name")
        if name in found:
            raise InvalidInput(f"output {name} is requested twice")
        found[name] = _object(entry.get("parameters"), f"output {name}: parameters")
    return found


def _binary_choice(
    body: dict[str, Any], outputs: dict[str, dict[str, Any]]
) -> Callable[[str], bool]:
    """Whether an output goes back as binary data: its own `binary_data`, else the request's
    `binary_data_output`, else JSON."""
    default = bool(_object(body.get("parameters"), "parameters").get("binary_data_output"))
    return lambda name: bool(outputs.get(name, {}).get("binary_data", default))


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        path = request.path[:200]
        raise HttpError(405, f"{request.method[:20]} is not allowed on {path}; use {allowed}")


def _model_metadata(found: ModelMetadata) -> dict[str, Any]:
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in specs]

    return {
        "name": found.name,
        "versions": [str(v) for v in found.versions],
        "platform": found.platform,
        "inputs": tensors(found.inputs),
        "outputs": tensors(found.outputs),
    }


def _reason(exc: OSError) -> str:
    # asyncio wraps the bind error in a long message; the errno says it in a few words.
    return (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
