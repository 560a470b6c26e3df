"""The operator's check of an agent's identity before a mutual-TLS channel is opened: one TLS
handshake with Python's `ssl`, whose failures become one line naming the agent.

grpc's own TLS errors are a generic UNAVAILABLE ("failed to connect to all addresses"), which would
hide a spoofed or foreign agent behind "unreachable". This handshake tells them apart: the project
CA and the agent's name are checked as grpc checks them, the certificate's fingerprint against
the one the agent's mDNS record announced, and whether the agent accepted the operator's
certificate (a TLS 1.3 server says so only after the handshake: it closes instead of talking).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mle_cli.targets._endpoint import Endpoint, TlsIdentity
from mle_proto.errors import AgentUnavailable, InvalidInput, MleError, Unauthenticated

__all__ = ["check_agent_identity", "pem_file"]

_SHOWN_HEX = 16  # digits of a fingerprint shown in a message
_NOT_FROM_CA = {2, 18, 19, 20, 21}  # X509_V_ERR_*: unknown issuer, self-signed, no chain
_EXPIRED, _NOT_YET_VALID, _NAME_MISMATCH = 10, 9, 62


async def check_agent_identity(endpoint: Endpoint, timeout: float) -> None:
    """Raise Unauthenticated unless the agent proves to be `endpoint.name` of this project and
    accepts the operator; AgentUnavailable when it cannot be reached."""
    tls = endpoint.tls
    if tls is None:
        return
    context = _client_context(tls)
    try:
        der, accepted = await _handshake(endpoint, context, timeout)
    except ssl.SSLCertVerificationError as exc:
        raise _agent_refused(endpoint.name, exc) from None
    except ssl.SSLError as exc:
        if _is_certificate_alert(exc):
            raise _operator_refused(endpoint.name, tls) from None
        raise Unauthenticated(
            f"agent {endpoint.name} at {endpoint.address} did not complete a TLS handshake "
            f"({(exc.reason or str(exc)).lower().replace('_', ' ')})",
            hint="is it started with --tls-cert, --tls-key and --tls-ca?",
        ) from None
    except OSError as exc:
        raise AgentUnavailable(f"agent {endpoint.name}: unreachable ({_reason(exc)})") from None
    except ValueError:  # ssl's IDNA encoding of the name failed: no certificate can carry it
        raise InvalidInput(f"agent name {endpoint.name!r} is not a valid TLS host name") from None
    if not accepted:
        raise _operator_refused(endpoint.name, tls)
    _check_fingerprint(endpoint, der)


async def _handshake(
    endpoint: Endpoint, context: ssl.SSLContext, timeout: float
) -> tuple[bytes, bool]:
    """The agent's certificate (DER) and whether the agent went on talking after the handshake.

    No thread: the default pool is small (min(32, cpus + 4)), and a few silent hosts would hold
    every worker, starving the checks of agents that answer."""
    host, port = _split_address(endpoint.address)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=endpoint.name),
            timeout,
        )
    except TimeoutError:
        raise TimeoutError("timed out") from None  # what a blocking socket says
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = (ssl_object.getpeercert(binary_form=True) if ssl_object else None) or b""
        return der, await _still_talking(reader, max(0.0, deadline - loop.time()))
    finally:
        writer.transport.abort()  # no TLS close to wait for: the agent learns nothing from it


async def _still_talking(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the agent sends on after the handshake or stays silent (False: it hung up)."""
    try:
        # A grpc server that accepted us sends its HTTP/2 settings at once; one that refused
        # our certificate closes the connection.
        return bool(await asyncio.wait_for(reader.read(1), timeout))
    except TimeoutError:
        return True  # silent, not refusing: let the RPC tell
    except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ConnectionResetError):
        return False
    except ssl.SSLError as exc:
        if _is_certificate_alert(exc):
            return False
        raise


def _reason(exc: OSError) -> str:
    """An OS error in a few lower-case words: `connection refused`, `timed out`."""
    text = os.strerror(exc.errno) if exc.errno else ""
    return (text or exc.strerror or str(exc) or type(exc).__name__).lower()


def _client_context(tls: TlsIdentity) -> ssl.SSLContext:
    """Trust the project CA only, present the operator's certificate, speak HTTP/2 as grpc does."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=tls.ca.decode("ascii", errors="replace"))
        if tls.cert:
            with pem_file(tls.cert + b"\n" + tls.key) as path:
                context.load_cert_chain(path)
    except (ssl.SSLError, ValueError):  # not PEM, or a key that is not the certificate's
        raise MleError("the operator's TLS identity (.mle/pki/) is damaged") from None
    context.set_alpn_protocols(["h2"])  # a grpc server drops a connection without it
    return context


@contextlib.contextmanager
def pem_file(data: bytes) -> Iterator[str]:
    """A path to read the key from: an anonymous memory file where Linux has them, else a
    private temporary file, removed at once (`ssl` loads keys from paths only)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("mle-operator-identity", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="mle-tls-") as directory:
        path = Path(directory) / "identity.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield str(path)


def _agent_refused(name: str, exc: ssl.SSLCertVerificationError) -> Unauthenticated:
    """The agent's certificate failed verification: say why in the user's words."""
    code = exc.verify_code
    if code in _NOT_FROM_CA:
        what = "a certificate not issued by this project's CA"
        hint = f"sign its request with `mle agent sign` (mle-agentd --name {name} --make-csr)"
    elif code == _NAME_MISMATCH:
        what = f"a certificate issued for another name, not {name}"
        hint = "is another agent answering at this address?"
    elif code == _EXPIRED:
        what = "an expired certificate"
        hint = "renew it: mle-agentd --make-csr, then mle agent sign"
    elif code == _NOT_YET_VALID:
        what = "a certificate that is not valid yet"
        hint = "check the clocks of both machines"
    else:
        what = f"a certificate that does not verify ({exc.verify_message})"
        hint = ""
    return Unauthenticated(f"agent {name} presented {what}; refusing it", hint=hint)


def _operator_refused(name: str, tls: TlsIdentity) -> Unauthenticated:
    problem = _client_certificate_problem(tls) or "it trusts another CA than this project's"
    return Unauthenticated(
        f"agent {name} refused this operator's certificate: {problem}",
        hint="start the agent with this project's .mle/pki/ca.crt as --tls-ca",
    )


def _client_certificate_problem(tls: TlsIdentity) -> str:
    """Why an agent trusting `tls.ca` would refuse this client certificate ("" when no reason
    shows from here: then the agent trusts another CA)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    if not tls.cert:
        return "this operator presents no client certificate"
    try:
        cert = x509.load_pem_x509_certificate(tls.cert)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(tls.ca))
    except (ValueError, TypeError, InvalidSignature):
        return "this operator's certificate is not issued by the project CA"
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc < now:
        return f"this operator's certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}"
    if cert.not_valid_before_utc > now:
        return "this operator's certificate is not valid yet (is a clock wrong?)"
    return ""


def _check_fingerprint(endpoint: Endpoint, der: bytes) -> None:
    presented = f"sha256:{hashlib.sha256(der).hexdigest()}"
    if not endpoint.fingerprint or presented == endpoint.fingerprint:
        return
    raise Unauthenticated(
        f"agent {endpoint.name} presented certificate {_short(presented)} but its mDNS record "
        f"says {_short(endpoint.fingerprint)}; refusing it",
        hint="another machine may be answering for it; `mle agents` shows what was announced",
    )


def _is_certificate_alert(exc: ssl.SSLError) -> bool:
    """An alert the peer sent about our certificate (TLS 1.2 sends it during the handshake)."""
    reason = exc.reason or ""
    return "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason)


def _short(fingerprint: str) -> str:
    algorithm, _, digest = fingerprint.partition(":")
    return f"{algorithm}:{digest[:_SHOWN_HEX]}…"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit():
        raise AgentUnavailable(f"invalid agent address {address!r}: expected HOST:PORT")
    return host, int(port)
