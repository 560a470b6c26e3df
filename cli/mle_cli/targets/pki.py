"""The project's certificate authority (`.mle/pki/`): it signs agent certificates and the
operator's client certificate, so agents and the operator trust each other by mutual TLS.

cryptography is imported here only, and lazily.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import TlsIdentity

__all__ = ["certificate_fingerprint", "ensure_ca", "operator_identity", "sign_agent_csr"]


def ensure_ca(settings: Settings) -> Path:
    """The pki directory holding `ca.crt` and `ca.key` (0600), created on first need."""
    raise NotImplementedError


def operator_identity(settings: Settings) -> TlsIdentity:
    """The CA and the operator's client key and certificate, created on first need."""
    raise NotImplementedError


def sign_agent_csr(
    settings: Settings, csr_pem: bytes, name: str, addresses: Sequence[str] = ()
) -> bytes:
    """A certificate (PEM) for an agent's CSR: `name` and `addresses` in its SAN."""
    raise NotImplementedError


def certificate_fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the certificate's DER (what agents put in their mDNS record)."""
    raise NotImplementedError
