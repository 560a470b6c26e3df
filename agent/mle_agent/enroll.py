"""Enrollment without SSH, the device's side: `printf '%s\n' TOKEN | mle-agentd --enroll -
--operator HOST:PORT --ca-fingerprint sha256:...` exchanges a single-use token from
`mle agent enroll-token` for this agent's certificate, then the agent serves with it.

The key is made here (`identity.agent_csr`) and never leaves. The operator is checked before the
token is sent: the CA it hands over must have the pinned fingerprint, and the certificate it
presented in the TLS handshake must be issued by that CA for enrollment (not an agent's). The
protocol and its limits are described in `mle_cli.targets.enroll`; a test checks both agree.
cryptography is imported lazily.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import re
import shlex
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.identity import KEY_FILE, agent_csr
from mle_agent.settings import AgentSettings, split_listen
from mle_proto.errors import (
    AgentUnavailable,
    DeadlineExceeded,
    MleError,
    Unauthenticated,
    UsageError,
)
from mle_proto.files import write_atomic

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["CA_FILE", "CERT_FILE", "MAX_LINE", "SERVER_CN_PREFIX", "TOKEN", "Enrollment", "enroll"]

CERT_FILE, CA_FILE = "agent.crt", "ca.crt"  # in the data dir, next to KEY_FILE
MAX_LINE = 64 * 1024
SERVER_CN_PREFIX = "mle enrollment "
TOKEN = r"([a-z0-9]{6})\.([a-z0-9]{16,64})"  # noqa: S105 - the shape, not a token
TIMEOUT = 30.0  # seconds for connecting, the handshake and each answer
_SHOWN_HEX = 16
_RENEW_BEFORE = datetime.timedelta(days=1)  # an enrolled certificate this close to expiry is redone


@dataclass(frozen=True)
class Enrollment:
    """The settings to serve with (mutual TLS from the enrolled files) and what to tell the user."""

    settings: AgentSettings
    message: str


def enroll(
    settings: AgentSettings,
    token: str,
    operator: str,
    ca_fingerprint: str,
    timeout: float = TIMEOUT,
) -> Enrollment:
    """Exchange `token` for this agent's certificate at `operator` (HOST:PORT), whose CA must
    have `ca_fingerprint`; skipped when the data dir already holds a certificate from that CA
    (a service restarted with `--enroll -` and nothing on stdin starts as enrolled)."""
    match = re.fullmatch(TOKEN, token.strip())
    pinned = _pinned(ca_fingerprint)
    host, port = split_listen(operator)
    files = _files(settings)
    cert_path, key_path, ca_path = files.tls_cert, files.tls_key, files.tls_ca
    assert cert_path is not None and key_path is not None and ca_path is not None
    done = _enrolled_fingerprint(files, pinned)
    if done:
        unused = f"token {match[1]} was not used" if match else "no token needed"
        return Enrollment(files, f"{settings.name} is already enrolled ({cert_path}, {done}); "
                          f"{unused}")  # fmt: skip
    if not token.strip():
        raise UsageError(
            "no enrollment token: give it on stdin with --enroll - (printf '%s\\n' TOKEN | "
            "mle-agentd ... --enroll -), as mle agent enroll-token prints"
        )
    if match is None:  # never echoed: it may be the secret with a typo
        raise UsageError(
            "invalid --enroll token: expected <id>.<secret> from mle agent enroll-token"
        )
    request = {
        "token": token.strip(),
        "name": settings.name,
        "csr": agent_csr(key_path, settings.name).decode(),
    }
    cert_pem, ca_pem = _exchange(host, port, pinned, request, timeout)
    fingerprint = _check_issued(cert_pem, ca_pem, key_path, settings.name)
    _write(ca_path, ca_pem)
    _write(cert_path, cert_pem)
    return Enrollment(files, _enrolled_message(files, operator, fingerprint))


def _exchange(
    host: str, port: int, pinned: str, request: dict[str, str], timeout: float
) -> tuple[bytes, bytes]:
    """One TLS connection: check the operator, send the request, return (certificate, CA)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # Checked by hand against the pinned CA below, before anything is sent: the CA is not known
    # yet, only its fingerprint, and the operator may be reached by any address (NAT, DNS).
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
            tls.makefile("rwb") as stream,
        ):
            hello = _read(stream, where)
            ca_pem = _check_operator(tls.getpeercert(binary_form=True), hello, pinned, where)
            stream.write(json.dumps(request).encode() + b"\n")
            stream.flush()
            reply = _read(stream, where)
    except TimeoutError:
        raise DeadlineExceeded(
            f"the operator at {where} did not answer within {timeout:g}s"
        ) from None
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        raise Unauthenticated(f"no TLS handshake with the operator at {where} ({reason})") from None
    except OSError as exc:
        raise AgentUnavailable(
            f"cannot reach the operator at {where}: {(exc.strerror or str(exc)).lower()}",
            hint="is mle agent enroll-token still serving there?",
        ) from None
    except (ValueError, OverflowError):  # UnicodeError (idna: a label over 63), a port too big
        raise UsageError(
            f"invalid --operator {where[:100]!r}: expected HOST:PORT with a valid host name or IP"
        ) from None
    return _certificate(reply, where), ca_pem


def _read(stream: io.BufferedIOBase, where: str) -> dict[str, Any]:
    line = stream.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise Unauthenticated(f"the operator at {where} closed the connection or sent garbage")
    try:
        message = json.loads(line)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        raise Unauthenticated(f"the operator at {where} does not speak mle enrollment")
    return message


def _check_operator(
    leaf_der: bytes | None, hello: dict[str, Any], pinned: str, where: str
) -> bytes:
    """The CA's PEM, once it has the pinned fingerprint and issued the operator's certificate
    for enrollment; Unauthenticated otherwise (the token is then never sent)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    refuse = f"refusing the operator at {where} (the token was not sent)"
    try:
        ca = x509.load_pem_x509_certificate(str(hello.get("ca", "")).encode())
        leaf = x509.load_der_x509_certificate(leaf_der or b"")
    except ValueError:
        raise Unauthenticated(f"{refuse}: it sent no usable certificates") from None
    presented = _fingerprint(ca)
    if presented != pinned:
        raise Unauthenticated(
            f"{refuse}: its CA is {_short(presented)}, not {_short(pinned)} (--ca-fingerprint)",
            hint="check the address, and the fingerprint mle agent enroll-token printed",
        )
    try:
        leaf.verify_directly_issued_by(ca)
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise Unauthenticated(
            f"{refuse}: its certificate is not issued by the project CA"
        ) from None
    names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    for_enrollment = (
        ExtendedKeyUsageOID.CLIENT_AUTH not in usages and ExtendedKeyUsageOID.SERVER_AUTH in usages
    )
    if not (for_enrollment and names and names[0].startswith(SERVER_CN_PREFIX)):
        raise Unauthenticated(
            f"{refuse}: its certificate is not the project's enrollment endpoint's (an agent's?)"
        )
    now = datetime.datetime.now(datetime.UTC)
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise Unauthenticated(
            f"{refuse}: its certificate is not valid now; is this device's clock right?"
        )
    return str(hello["ca"]).encode()


def _certificate(reply: dict[str, Any], where: str) -> bytes:
    if "error" in reply:
        text = "".join(c if c.isprintable() else "?" for c in str(reply["error"]))[:300]
        raise Unauthenticated(f"the operator at {where} refused the enrollment: {text}")
    if not isinstance(reply.get("cert"), str):
        raise Unauthenticated(f"the operator at {where} sent no certificate")
    return str(reply["cert"]).encode()


def _check_issued(cert_pem: bytes, ca_pem: bytes, key_path: Path, name: str) -> str:
    """The certificate's fingerprint once it is from the CA, for `name` and for this key."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        ours = _public_key(key_path) == cert.public_key()
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        raise MleError("the operator sent a certificate that is not from its CA") from None
    if not ours or name not in san.get_values_for_type(x509.DNSName):
        raise MleError(f"the operator sent a certificate for another key or name than {name}")
    return _fingerprint(cert)


def _enrolled_fingerprint(files: AgentSettings, pinned: str) -> str:
    """The fingerprint of a usable certificate already enrolled from the pinned CA, else ""."""
    assert files.tls_cert is not None and files.tls_key is not None and files.tls_ca is not None
    from cryptography import x509

    try:
        ca_pem = files.tls_ca.read_bytes()
        if _fingerprint(x509.load_pem_x509_certificate(ca_pem)) != pinned:
            return ""
        fingerprint = _check_issued(files.tls_cert.read_bytes(), ca_pem, files.tls_key, files.name)
        cert = x509.load_pem_x509_certificate(files.tls_cert.read_bytes())
    except (OSError, ValueError, MleError):
        return ""
    remaining = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    return fingerprint if remaining > _RENEW_BEFORE else ""


def _files(settings: AgentSettings) -> AgentSettings:
    """Settings serving with the enrolled files: the configured TLS paths, else the data dir's."""
    if settings.tls:
        return settings
    data = settings.data_dir
    return dataclasses.replace(
        settings, tls_cert=data / CERT_FILE, tls_key=data / KEY_FILE, tls_ca=data / CA_FILE
    )


def _enrolled_message(files: AgentSettings, operator: str, fingerprint: str) -> str:
    flags = ["--name", files.name, "--data-dir", str(files.data_dir.absolute())]
    flags += ["--tls-cert", str(files.tls_cert), "--tls-ca", str(files.tls_ca)]
    if files.tls_key != files.data_dir / KEY_FILE:
        flags += ["--tls-key", str(files.tls_key)]
    return (
        f"enrolled {files.name} with the operator at {operator}: wrote {files.tls_cert} "
        f"({fingerprint}) and {files.tls_ca}; later starts need no token: "
        f"{shlex.join(['mle-agentd', *flags])}"
    )


def _pinned(text: str) -> str:
    fingerprint = text.strip().lower().replace(":", "").removeprefix("sha256")
    if not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        raise UsageError(
            f"invalid --ca-fingerprint {text[:80]!r}: expected sha256:<64 hex digits> as printed "
            "by mle agent enroll-token"
        )
    return f"sha256:{fingerprint}"


def _fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return f"sha256:{hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()}"


def _public_key(key_path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return key.public_key()


def _short(fingerprint: str) -> str:
    return f"{fingerprint[: len('sha256:') + _SHOWN_HEX]}…"


def _write(path: Path, data: bytes) -> None:
    """Write a public file (0644) atomically."""
    try:
        write_atomic(path, data)
    except OSError as exc:
        raise MleError(f"cannot write {path}: {exc.strerror or exc}") from None
