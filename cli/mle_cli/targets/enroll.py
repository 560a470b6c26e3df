"""Enrollment without SSH: an agent exchanges a single-use token for its certificate.

`mle agent enroll-token --name srv-01` makes a token `<id>.<secret>` bound to that name, valid for
a short time, and serves the enrollment endpoint until it is used or expires. As with kubeadm's
bootstrap tokens, the operator keeps only a hash of the secret (`.mle/pki/tokens.json`, 0600), and
the device pins the project CA by the fingerprint printed with the token, so it checks the
operator before it sends anything.

The wire protocol is one TLS connection carrying JSON lines of at most MAX_LINE bytes
(`mle_agent.enroll` speaks the device's side; a test checks both agree):

    operator -> device   {"ca": PEM}                                    at once
    device -> operator   {"token": "<id>.<secret>", "name": N, "csr": PEM}
    operator -> device   {"cert": PEM, "ca": PEM}   or   {"error": "one line"}

Plain TLS rather than gRPC: the device knows the CA only by its fingerprint, and gRPC's TLS needs
the root before connecting and has no hook to check one, so it would need this exchange anyway.
The endpoint's certificate is issued by the project CA for enrollment only (CN SERVER_CN_PREFIX...,
server use only), so no agent's certificate can stand in for the operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import shlex
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mle_cli.settings import Settings
from mle_cli.targets import pki
from mle_cli.targets._enroll_tokens import TOKEN, TokenStore, WrongSecret, check_token, when
from mle_proto.errors import (
    DeadlineExceeded,
    InvalidInput,
    MleError,
    Unauthenticated,
    UsageError,
)

__all__ = [
    "DEFAULT_TTL",
    "MAX_BAD_ATTEMPTS",
    "MAX_LINE",
    "SERVER_CN_PREFIX",
    "TOKEN",
    "TTL_RANGE",
    "Enrolled",
    "Offer",
    "enroll_agent",
    "parse_listen",
]

DEFAULT_TTL = 15 * 60.0
TTL_RANGE = (1.0, 24 * 3600.0)
# Wrong secrets for this session's own token before it gives up (and revokes it). Garbage,
# malformed or unknown tokens are refused and reported but not counted: anyone who can connect
# could send those, and must not be able to end the session.
MAX_BAD_ATTEMPTS = 10
MAX_LINE = 64 * 1024  # a request or reply; a CSR or certificate is about 1 KiB
SERVER_CN_PREFIX = "mle enrollment "  # a space: never an agent's name, so never its certificate
_REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request
_POLL = 1.0  # how often a session looks whether another session redeemed its token
_MAX_CONNECTIONS = 32
_SERVER_CERT_DAYS = 1  # the endpoint's key lives in memory for one session only
_UNSPECIFIED = {"", "0.0.0.0", "::"}  # noqa: S104 - recognised, not bound
_HOST = re.compile(r"[A-Za-z0-9.:_-]{1,253}")  # an IP or a host name, nothing a shell would read

Report = Callable[[str], None]


@dataclass(frozen=True)
class Offer:
    """A token being served, and what to run on the device to use it."""

    token_id: str
    name: str
    token: str = field(repr=False)
    operator: str  # HOST:PORT the device connects to
    listen: str  # where the endpoint listens
    ca_fingerprint: str
    expires: float

    def device_command(self) -> str:
        """The one command to run on the device: the token goes in on stdin, by printf (a shell
        builtin), since a process's arguments are readable by every local user."""
        agentd = shlex.join(
            ["mle-agentd", "--name", self.name, "--enroll", "-", "--operator", self.operator,
             "--ca-fingerprint", self.ca_fingerprint]
        )  # fmt: skip
        return f"printf '%s\\n' {shlex.quote(self.token)} | {agentd}"


@dataclass(frozen=True)
class Enrolled:
    """Who redeemed a token: the agent's name, its address, its new certificate's fingerprint."""

    name: str
    peer: str
    fingerprint: str


def enroll_agent(
    settings: Settings,
    name: str,
    ttl: float = DEFAULT_TTL,
    *,
    on_offer: Callable[[Offer], None],
    on_refusal: Report,
    listen: str | None = None,
    address: str | None = None,
) -> Enrolled:
    """Make a token for `name` and serve enrollment until an agent redeems it; raise when it
    expires or too many bad attempts arrive. A token not redeemed is revoked on the way out."""
    pki.check_agent_name(name)
    low, high = TTL_RANGE
    if not low <= ttl <= high:
        raise UsageError(f"invalid ttl {ttl:g}s: between {low:g}s and {high / 3600:g}h")
    if address is not None and not _HOST.fullmatch(address):
        raise UsageError(f"invalid address {address[:80]!r}: expected an IP or a host name")
    session = _Session(settings, name, ttl, on_refusal)
    try:
        return asyncio.run(session.run(listen or settings.enroll_listen, address, on_offer))
    finally:
        with contextlib.suppress(MleError):  # never hide why the session ended
            session.revoke_unless_redeemed()


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) as host and port; UsageError when malformed."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"invalid listen address {text!r}: expected HOST:PORT")
    return host, int(port)


class _Session:
    """One token and the endpoint serving it."""

    def __init__(self, settings: Settings, name: str, ttl: float, report: Report) -> None:
        self.settings, self.name, self.ttl, self.report = settings, name, ttl, report
        self.store = TokenStore(pki.pki_dir(settings))
        self.token_id = ""
        self.expires = 0.0
        self.refusals = 0
        self.active = 0
        self.enrolled: Enrolled | None = None
        self.failure: MleError | None = None
        self.redeemed_here: set[str] = set()  # tokens this endpoint spent: it reports them
        self.ca_pem = b""
        self.changed = asyncio.Event()

    async def run(
        self, listen: str, address: str | None, on_offer: Callable[[Offer], None]
    ) -> Enrolled:
        host, port = parse_listen(listen)
        directory = await asyncio.to_thread(pki.ensure_ca, self.settings)
        self.ca_pem = (directory / "ca.crt").read_bytes()
        reachable = address or _reachable_host(host)
        context = await asyncio.to_thread(_server_context, self.settings, [reachable, host])
        async with await _listen(self.handle, host, port, context, listen) as server:
            bound = server.sockets[0].getsockname()[1]
            token = await asyncio.to_thread(self._new_token)
            on_offer(
                Offer(self.token_id, self.name, token, _join(reachable, bound), _join(host, bound),
                      pki.certificate_fingerprint(self.ca_pem), self.expires)
            )  # fmt: skip
            return await self._wait()

    async def _wait(self) -> Enrolled:
        while self.enrolled is None:
            if self.failure is not None:
                raise self.failure
            remaining = self.expires - time.time()
            if remaining <= 0:
                raise DeadlineExceeded(
                    f"token {self.token_id} expired at {when(self.expires)} before {self.name} "
                    "enrolled; make a new one with mle agent enroll-token"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, _POLL))
            self.changed.clear()
            if self.enrolled is None:
                self.enrolled = await asyncio.to_thread(self._redeemed_elsewhere)
        return self.enrolled

    def _new_token(self) -> str:
        made = self.store.add(self.name, self.ttl)
        self.token_id, self.expires = made.id, made.expires
        return made.token

    def _redeemed_elsewhere(self) -> Enrolled | None:
        """This session's token as redeemed through another session's endpoint, if it was."""
        if self.token_id in self.redeemed_here:  # its handler ends the session once it replied
            return None
        record = self.store.find(self.token_id)
        if record is None or not record.get("used_at"):
            return None
        return Enrolled(self.name, str(record.get("used_by", "")), str(record.get("fingerprint")))

    def revoke_unless_redeemed(self) -> None:
        """Revoke this session's token when it was made and is still usable."""
        if not self.token_id or self.enrolled is not None:
            return
        self.store.revoke(self.token_id)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one connection: the CA, then one request and its answer."""
        if self.active >= _MAX_CONNECTIONS:
            writer.close()
            return
        self.active += 1
        peer = _peer_host(writer)
        enrolled: Enrolled | None = None
        try:
            writer.write(_line({"ca": self.ca_pem.decode("ascii")}))
            reply, enrolled = await self._answer(reader, peer)
            if reply:
                writer.write(_line(reply))
                await asyncio.wait_for(writer.drain(), _REQUEST_TIMEOUT)
        except (OSError, TimeoutError):  # the device went away: the token stays spent
            pass
        finally:
            self.active -= 1
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), _REQUEST_TIMEOUT)
            # Only now, the reply out: the session may end with this connection (its token
            # redeemed, or one bad attempt too many).
            if enrolled is not None:
                self.enrolled = self.enrolled or enrolled
            self.changed.set()

    async def _answer(
        self, reader: asyncio.StreamReader, peer: str
    ) -> tuple[dict[str, str], Enrolled | None]:
        """The reply to this connection's request, and who enrolled when it is this session's."""
        try:
            line = await asyncio.wait_for(reader.readline(), _REQUEST_TIMEOUT)
        except TimeoutError:
            return self._refuse(peer, f"no request within {_REQUEST_TIMEOUT:g}s"), None
        except ValueError:  # the stream's limit: a line longer than MAX_LINE
            return self._refuse(peer, f"request larger than {MAX_LINE // 1024} KiB"), None
        if not line:
            return {}, None  # closed without asking: a device that did not trust this endpoint
        try:
            request = _parse_request(line)
            cert, enrolled = await asyncio.to_thread(self._redeem, request, peer)
        except WrongSecret as exc:
            ours = request["token_id"] == self.token_id
            return self._refuse(peer, exc.message, counted=ours), None
        except MleError as exc:
            return self._refuse(peer, exc.message), None
        reply = {"cert": cert.decode("ascii"), "ca": self.ca_pem.decode("ascii")}
        return reply, enrolled if request["token_id"] == self.token_id else None

    def _refuse(self, peer: str, message: str, *, counted: bool = False) -> dict[str, str]:
        self.report(f"refused an enrollment from {peer}: {message}")
        self.refusals += counted
        if self.refusals >= MAX_BAD_ATTEMPTS and self.failure is None:
            self.failure = Unauthenticated(
                f"stopped after {MAX_BAD_ATTEMPTS} refused enrollment attempts; token "
                f"{self.token_id} is revoked",
                hint="make a new one with mle agent enroll-token",
            )
        return {"error": message}

    def _redeem(self, request: Mapping[str, str], peer: str) -> tuple[bytes, Enrolled]:
        """Check the token, sign the request, mark the token used (under the store's lock)."""
        token_id, secret, name = request["token_id"], request["secret"], request["name"]
        check_token(self.store.find(token_id), token_id, secret, name, time.time())
        # Signed before the token is spent, so a bad request leaves it usable; the CA key is
        # touched only for a request whose token checked out.
        cert = pki.sign_agent_csr(self.settings, request["csr"].encode(), name, [peer])
        fingerprint = pki.certificate_fingerprint(cert)
        self.store.redeem(token_id, secret, name, peer, fingerprint)
        self.redeemed_here.add(token_id)
        return cert, Enrolled(name, peer, fingerprint)


def _parse_request(line: bytes) -> dict[str, str]:
    """The token (split), name and CSR of a request line; InvalidInput when malformed."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("not an enrollment request (expected one JSON line)") from None
    if not isinstance(request, dict) or not all(
        isinstance(request.get(k), str) for k in ("token", "name", "csr")
    ):
        raise InvalidInput("an enrollment request needs token, name and csr (strings)")
    match = re.fullmatch(TOKEN, request["token"])
    if match is None:
        raise Unauthenticated("malformed token: expected <id>.<secret> from mle agent enroll-token")
    pki.check_agent_name(request["name"])  # before it is shown anywhere
    return {"token_id": match[1], "secret": match[2], "name": request["name"],
            "csr": request["csr"]}  # fmt: skip


def _server_context(settings: Settings, hosts: Sequence[str]) -> ssl.SSLContext:
    """A TLS server context with a fresh key and a certificate the project CA issues for
    enrollment (server use only) naming `hosts`."""
    from mle_cli.targets._trust import pem_file

    label = f"{SERVER_CN_PREFIX}{settings.project_dir.name}"[:64]
    cert, key = pki.issue_server_certificate(settings, label, _alt_names(hosts), _SERVER_CERT_DAYS)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with pem_file(cert + key) as path:
        context.load_cert_chain(path)
    return context


def _alt_names(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    names: dict[str, Any] = {}
    for host in hosts:
        if host in _UNSPECIFIED:
            continue
        try:
            names.setdefault(host, x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.setdefault(host.lower(), x509.DNSName(host))
    return list(names.values()) or [x509.DNSName("localhost")]


async def _listen(
    handle: Any, host: str, port: int, context: ssl.SSLContext, listen: str
) -> asyncio.Server:
    try:
        return await asyncio.start_server(
            handle, host, port, ssl=context, ssl_handshake_timeout=_REQUEST_TIMEOUT,
            limit=MAX_LINE, reuse_address=True,
        )  # fmt: skip
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {listen}: {os.strerror(exc.errno).lower() if exc.errno else exc}",
            hint="another mle agent enroll-token may be serving there; give --listen HOST:PORT",
        ) from None


def _reachable_host(host: str) -> str:
    """The address to tell devices: the listen host, or this machine's primary IP for a
    wildcard (the source address of its default route; no packet is sent)."""
    if host not in _UNSPECIFIED:
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: any routable address would do
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostname()


def _peer_host(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    host = str(peer[0]).partition("%")[0] if peer else "unknown"  # no IPv6 scope in a SAN
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
    return host


def _line(message: Mapping[str, str]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
