"""How to reach one agent."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Endpoint", "TlsIdentity"]


@dataclass(frozen=True)
class TlsIdentity:
    """What the operator presents and trusts over mutual TLS: PEM bytes of the project CA, and
    the operator's own client key and certificate (signed by that CA)."""

    ca: bytes
    key: bytes = field(repr=False)
    cert: bytes


@dataclass(frozen=True)
class Endpoint:
    """An agent's address and the credentials to call it. Secrets are never printed.

    With `tls`, the channel is mutual TLS and the agent's certificate must be issued by the
    project CA for `name` (its SAN); with `fingerprint` (`sha256:<hex>`, from its mDNS record)
    it must also be that very certificate.
    """

    name: str
    address: str
    token: str | None = field(default=None, repr=False)
    tls: TlsIdentity | None = None
    fingerprint: str = ""
