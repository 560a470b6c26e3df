"""The agent's TLS identity, made on the device: its private key and a certificate signing request
(CSR) the operator signs with the project CA (`mle agent sign`). The key never leaves this machine.

cryptography is imported here only, and lazily.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_agent.settings import NAME, AgentSettings, split_listen
from mle_proto.errors import MleError, UsageError

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "KEY_FILE",
    "NAME",
    "NOT_OPERATOR_MESSAGE",
    "OPERATOR_CN_PREFIX",
    "agent_csr",
    "is_operator",
    "make_csr",
]

KEY_FILE = "agent.key"  # in the data dir
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# The common name of the operator's client certificate starts with this (the project CA issues
# it; mle_cli.targets.pki.OPERATOR_CN_PREFIX, a test checks they agree). The space keeps every
# agent out: no agent name has one, so another agent's certificate never passes.
OPERATOR_CN_PREFIX = "mle operator "
NOT_OPERATOR_MESSAGE = "only the operator may call this agent"

log = logging.getLogger(__name__)


def agent_csr(key_path: Path, name: str, addresses: Sequence[str] = ()) -> bytes:
    """A CSR (PEM) for `name` with `addresses` in its SAN; the key (0600, in a directory made
    0700) is created if absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    if not NAME.fullmatch(name):
        raise UsageError(
            f"invalid name {name[:80]!r} for a certificate: 1 to 63 letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    key = _load_or_create_key(key_path)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    san = x509.SubjectAlternativeName(_alt_names(name, addresses))
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    csr = builder.add_extension(san, critical=False).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def is_operator(common_names: Sequence[str]) -> bool:
    """Whether a verified client certificate with these subject common names is the operator's."""
    return bool(common_names) and all(cn.startswith(OPERATOR_CN_PREFIX) for cn in common_names)


def make_csr(settings: AgentSettings, csr_path: Path) -> str:
    """Write this agent's CSR to `csr_path` (its key in the data dir); say what to do next."""
    key_path = settings.data_dir / KEY_FILE
    csr = agent_csr(key_path, settings.name, _listen_addresses(settings))
    try:
        csr_path.write_bytes(csr)
    except OSError as exc:
        raise MleError(f"cannot write {csr_path}: {exc.strerror or exc}") from None
    return (
        f"wrote the certificate request of {settings.name} to {csr_path} (its key stays in "
        f"{key_path.absolute()}); on the operator machine run: mle agent sign {csr_path.name} "
        f"--name {settings.name} [--address IP]"
    )


def _listen_addresses(settings: AgentSettings) -> list[str]:
    """The listen host when it names one outside address (a wildcard or loopback says nothing)."""
    host, _ = split_listen(settings.listen)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [] if host == "localhost" else [host]
    return [] if ip.is_unspecified or ip.is_loopback else [host]


def _alt_names(name: str, addresses: Sequence[str]) -> list[x509.GeneralName]:
    from cryptography import x509

    entries: dict[str, x509.GeneralName] = {name.lower(): x509.DNSName(name)}
    for address in addresses:
        try:
            entries.setdefault(address, x509.IPAddress(ipaddress.ip_address(address)))
            continue
        except ValueError:
            pass
        if len(address) > 253 or not all(
            _DNS_LABEL.fullmatch(label) for label in address.removesuffix(".").split(".")
        ):
            raise UsageError(f"invalid address {address[:80]!r}: expected an IP or a host name")
        entries.setdefault(address.lower(), x509.DNSName(address))
    return list(entries.values())


def _load_or_create_key(path: Path) -> Any:
    """The private key at `path`; a new ECDSA P-256 key (0600) when there is none yet."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise MleError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        if _create_private(path, pem):
            return key
    return _load_key(path)


def _create_private(path: Path, pem: bytes) -> bool:
    """Write a 0600 file that appears whole or not at all; False when one already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        tmp.unlink()  # left by a run that died here
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # unlike a rename, never replaces a key made meanwhile
        return True
    except FileExistsError:
        return False
    except OSError as exc:
        raise MleError(f"cannot write the agent key {path}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MleError(f"cannot read the agent key {path}: {exc.strerror or exc}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):  # garbage, or a passphrase we do not have
        raise UsageError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise UsageError(f"{path} holds a {type(key).__name__}; an ECDSA or RSA key is needed")
    if path.stat().st_mode & 0o077:
        log.warning("agent key %s is readable by other users; chmod 600 it", path)
    return key
