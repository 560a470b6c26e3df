"""A small HTTP/1.1 server on asyncio streams, for the agent's REST routes (no new dependency).

Keep-alive, Content-Length bodies (no chunked uploads), `Expect: 100-continue`. Hostile clients
get a one-line JSON error and the connection closed: a head over HEAD_LIMIT -> 431, a body over
`max_body` -> 413 before a byte of it is read, a malformed head -> 400, a missing or wrong bearer
token -> 401, under mutual TLS a client certificate that is not the operator's -> 403; a client
that stalls for `timeout` seconds is disconnected. The handler answers everything else; it runs
on the event loop and must move blocking work to threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mle_agent.identity import NOT_OPERATOR_MESSAGE, is_operator
from mle_proto.errors import UsageError

__all__ = [
    "HEAD_LIMIT",
    "READ_TIMEOUT",
    "HttpError",
    "HttpServer",
    "Request",
    "Response",
    "error_response",
    "json_response",
    "server_ssl_context",
]

HEAD_LIMIT = 64 * 1024  # request line + headers
READ_TIMEOUT = 30.0  # seconds a client may take to send a head or a body, or stay idle
_LINGER = 1.0  # seconds to keep reading after refusing a request, before closing
_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 411: "Length Required", 413: "Content Too Large",
    429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}  # fmt: skip
# Headers that must not repeat: two values would let a proxy and this server disagree.
_SINGLE = ("content-length", "authorization", "inference-header-content-length")


@dataclass(frozen=True)
class Request:
    """One parsed HTTP request."""

    method: str
    path: str  # without the query string, still percent-encoded
    version: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


@dataclass(frozen=True)
class Response:
    """One HTTP response to write."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


class HttpError(Exception):
    """A request refused with an HTTP status and a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


Handler = Callable[[Request], Awaitable[Response]]


def json_response(status: int, content: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """A JSON response."""
    return Response(status, json.dumps(content).encode(), headers=headers)


def error_response(status: int, message: str) -> Response:
    """`{"error": message}` with a status; 401 carries the Bearer challenge."""
    headers = (("WWW-Authenticate", "Bearer"),) if status == 401 else ()
    return json_response(status, {"error": message}, headers)


def server_ssl_context(cert: Path, key: Path, ca: Path) -> ssl.SSLContext:
    """Server TLS that requires a client certificate chaining to `ca`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load TLS files for HTTP: {exc.strerror or exc}") from None
    return context


class HttpServer:
    """Connections, framing and bearer-token auth around one request handler."""

    def __init__(
        self,
        handler: Handler,
        *,
        token: str | None,
        max_body: int,
        unauthenticated: str = "missing or wrong token",
        timeout: float = READ_TIMEOUT,
    ) -> None:
        self._handler = handler
        self._expected = f"Bearer {token}".encode() if token else None
        self._unauthenticated = unauthenticated
        self._max_body = max_body
        self._timeout = timeout
        self._server: asyncio.Server | None = None
        self._idle: set[asyncio.Task[Any]] = set()
        self._busy: set[asyncio.Task[Any]] = set()
        self._writers: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}

    async def bind(self, host: str, port: int, context: ssl.SSLContext | None = None) -> None:
        """Listen and serve (OSError when the address cannot be bound)."""
        self._server = await asyncio.start_server(
            self._connection, host, port, ssl=context, limit=HEAD_LIMIT, backlog=128
        )

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def in_progress(self) -> int:
        """Requests read and not yet answered."""
        return len(self._busy)

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; requests in progress get `grace` seconds, idle connections none."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._idle):
            self._writers[task].transport.abort()
        if self._busy and grace > 0:
            await asyncio.wait(self._busy, timeout=grace)
        tasks = set(self._writers)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        await self._server.wait_closed()

    def _serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._writers[task] = writer
        try:
            await self._requests(task, reader, writer)
        except asyncio.CancelledError:
            pass  # the server is closing; ending normally keeps asyncio from logging the task
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away or stalled
        self._idle.discard(task)
        self._busy.discard(task)
        writer.close()  # flushes what is still buffered, then closes
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(writer.wait_closed(), self._timeout)
        writer.transport.abort()
        del self._writers[task]

    async def _requests(
        self, task: asyncio.Task[Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            self._busy.discard(task)
            self._idle.add(task)
            try:
                request = await self._read(reader, writer, task)
            except HttpError as exc:
                await _write(writer, error_response(exc.status, exc.message), keep=False)
                await _discard_input(reader)
                return
            if request is None:
                return
            response = await self._handler(request)
            keep = _keep_alive(request) and self._serving()
            await _write(writer, response, keep)
            if not keep:
                return

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, task: asyncio.Task[Any]
    ) -> Request | None:
        """The next request on a connection; None when the client closed it between requests."""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self._timeout)
        except asyncio.IncompleteReadError:
            return None  # closed between requests (or mid-head: nobody left to answer)
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request head is larger than {HEAD_LIMIT} bytes") from None
        self._idle.discard(task)
        self._busy.add(task)
        method, target, version, headers = _parse_head(head)
        if not _operator_or_plain(writer):
            raise HttpError(403, NOT_OPERATOR_MESSAGE)
        if self._expected is not None and not self._authorized(headers):
            raise HttpError(401, self._unauthenticated)
        length = self._body_length(headers)
        if length and headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await asyncio.wait_for(reader.readexactly(length), self._timeout) if length else b""
        return Request(method, urlsplit(target).path, version, headers, body)

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        assert self._expected is not None
        given = headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, self._expected)

    def _body_length(self, headers: Mapping[str, str]) -> int:
        """The declared body length; refuses chunked, malformed and oversized bodies."""
        if "transfer-encoding" in headers:
            raise HttpError(411, "chunked request bodies are not supported: send Content-Length")
        text = headers.get("content-length", "0")
        if not text.isascii() or not text.isdigit():
            raise HttpError(400, f"invalid Content-Length {text[:40]!r}")
        digits = text.lstrip("0") or "0"
        # Length first: int() refuses over 4300 digits, and so many are over any limit anyway.
        if len(digits) > len(str(self._max_body)) or int(digits) > self._max_body:
            shown = digits if len(digits) <= 20 else f"{digits[:20]}…"
            raise HttpError(
                413, f"request body is {shown} bytes; the agent's limit is {self._max_body}"
            )
        return int(digits)


def _operator_or_plain(writer: asyncio.StreamWriter) -> bool:
    """False when the connection is TLS and its client certificate is not the operator's: any
    agent's certificate is from the project CA too, and must not call another agent."""
    ssl_object: ssl.SSLObject | None = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return True  # plain HTTP: only where the settings allow it (loopback or --insecure)
    subject = (ssl_object.getpeercert() or {}).get("subject", ())
    names = [
        str(attribute[1])
        for rdn in subject
        if isinstance(rdn, tuple)
        for attribute in rdn
        if isinstance(attribute, tuple) and attribute[0] == "commonName"
    ]
    return is_operator(names)


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """Request line and headers; HttpError 400 when malformed."""
    lines = head.decode("latin-1").split("\r\n")
    while lines and not lines[0]:
        lines.pop(0)  # stray CRLFs before a request line are allowed
    parts = lines[0].split(" ") if lines else []
    if len(parts) != 3 or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise HttpError(505, f"unsupported HTTP version {version[:20]!r}")
    headers: dict[str, str] = {}
    for line in filter(None, lines[1:]):
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        key = name.lower()
        if key in headers and key in _SINGLE:
            raise HttpError(400, f"header {name[:60]} given twice")
        headers[key] = value.strip()
    return method, target, version, headers


def _keep_alive(request: Request) -> bool:
    connection = request.headers.get("connection", "").lower()
    if request.version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


async def _write(writer: asyncio.StreamWriter, response: Response, keep: bool) -> None:
    lines = [
        f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Error')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep else 'close'}",
        *(f"{name}: {value}" for name, value in response.headers),
    ]
    writer.writelines([("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), response.body])
    await writer.drain()


async def _discard_input(reader: asyncio.StreamReader) -> None:
    """Read what the client still sends, briefly: closing with unread data resets the
    connection, and the client could lose the error response written just before."""
    with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
        async with asyncio.timeout(_LINGER):
            while await reader.read(HEAD_LIMIT):
                pass
