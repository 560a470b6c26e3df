"""Certificates for tests: TLS agents enrolled in a project the way a user enrolls them (the key
made by the agent's own code, the request signed by the project CA), and broken client identities
(self-signed, expired, from another CA) built with cryptography directly."""

from __future__ import annotations

import datetime
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mle_agent.identity import agent_csr
from mle_agent.settings import AgentSettings
from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint, TlsIdentity
from mle_cli.targets.pki import (
    certificate_fingerprint,
    ensure_ca,
    operator_identity,
    sign_agent_csr,
)

__all__ = [
    "AgentTls",
    "client_identity",
    "expired_agent_tls",
    "issue_agent_tls",
    "key_pem",
    "tls_endpoint",
]

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class AgentTls:
    """An agent's certificate, key and the project CA, as files, and its fingerprint."""

    name: str
    cert: Path
    key: Path
    ca: Path
    fingerprint: str

    @property
    def flags(self) -> list[str]:
        """The `mle-agentd` flags that serve with this identity."""
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key), "--tls-ca", str(self.ca)]

    def apply(self, settings: AgentSettings) -> AgentSettings:
        """In-process agent settings serving with this identity (and this name)."""
        return replace(
            settings, name=self.name, tls_cert=self.cert, tls_key=self.key, tls_ca=self.ca
        )


def issue_agent_tls(
    settings: Settings,
    name: str,
    addresses: tuple[str, ...] = ("127.0.0.1",),
    out_dir: Path | None = None,
) -> AgentTls:
    """Enroll an agent in the project: key and CSR by `agent_csr`, certificate by the CA."""
    out = out_dir or settings.project_dir.parent / f"agent-tls-{name}"
    out.mkdir(parents=True, exist_ok=True)
    key = out / f"{name}.key"
    cert_pem = sign_agent_csr(settings, agent_csr(key, name, addresses), name, addresses)
    cert = out / f"{name}.crt"
    cert.write_bytes(cert_pem)
    ca = out / "ca.crt"
    shutil.copyfile(ensure_ca(settings) / "ca.crt", ca)
    return AgentTls(name, cert, key, ca, certificate_fingerprint(cert_pem))


def tls_endpoint(settings: Settings, name: str, address: str, fingerprint: str = "") -> Endpoint:
    """How the operator of this project reaches an agent over mutual TLS."""
    return Endpoint(name, address, tls=operator_identity(settings), fingerprint=fingerprint)


def client_identity(
    ca_pem: bytes,
    *,
    issuer_cert: Path | None = None,
    issuer_key: Path | None = None,
    expired: bool = False,
) -> TlsIdentity:
    """A client identity trusting `ca_pem`: self-signed unless an issuer is given; expired
    yesterday when asked."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mle test client")])
    issuer_name, signer = subject, key
    if issuer_cert is not None and issuer_key is not None:
        issuer_name = x509.load_pem_x509_certificate(issuer_cert.read_bytes()).subject
        signer = serialization.load_pem_private_key(issuer_key.read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())
    )
    return TlsIdentity(ca_pem, key_pem(key), cert.public_bytes(serialization.Encoding.PEM))


def expired_agent_tls(settings: Settings, name: str, out_dir: Path) -> AgentTls:
    """An agent certificate from the project CA for `name` that expired yesterday."""
    tls = issue_agent_tls(settings, name, out_dir=out_dir)
    pki = ensure_ca(settings)
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    issued = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(issued.subject)
        .issuer_name(ca_cert.subject)
        .public_key(issued.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - 30 * DAY)
        .not_valid_after(now - DAY)
    )
    for extension in issued.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    tls.cert.write_bytes(pem)
    return replace(tls, fingerprint=certificate_fingerprint(pem))


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
