"""The project's certificate authority (`.mle/pki/`): it signs agent certificates and the
operator's client certificate, so agents and the operator trust each other by mutual TLS.

Keys are ECDSA P-256 (what grpc's BoringSSL and every OpenSSL accept), PKCS#8 PEM, mode 0600 in
a 0700 directory. Files are written to a temporary name and renamed, and created under a lock,
so two `mle` processes never make two CAs. cryptography is imported here only, and lazily.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mle_cli.settings import Settings
from mle_cli.targets._endpoint import TlsIdentity
from mle_cli.targets._files import lock_file, write_file
from mle_cli.targets.selectors import NAME
from mle_proto.errors import InvalidInput, MleError

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "AGENT_CERT_DAYS",
    "CA_CERT_DAYS",
    "OPERATOR_CN_PREFIX",
    "OPERATOR_OU",
    "SignedAgent",
    "certificate_fingerprint",
    "check_agent_name",
    "ensure_ca",
    "issue_server_certificate",
    "lock_file",
    "operator_identity",
    "pki_dir",
    "sign_agent_csr",
    "sign_agent_request",
    "write_file",
]

CA_CERT_DAYS = 3650
AGENT_CERT_DAYS = 730
OPERATOR_CERT_DAYS = 730
# Boards without a real-time clock boot with a clock somewhat in the past until NTP answers:
# a certificate valid from this very second would be "not yet valid" to them.
_BACKDATE = datetime.timedelta(hours=1)
_RENEW_BEFORE = datetime.timedelta(days=30)  # the operator certificate is replaced this early
_WEAK_KEY = "the request's key is not ECDSA P-256/P-384 or RSA of 2048+ bits"
_DNS_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_CN_MAX = 64  # ub-common-name in RFC 5280
# What marks the operator's client certificate; agents accept calls from it alone
# (mle_agent.identity.OPERATOR_CN_PREFIX, a test checks they agree). A space: never an agent name.
OPERATOR_CN_PREFIX = "mle operator "
OPERATOR_OU = "mle-operator"


def pki_dir(settings: Settings) -> Path:
    """Where the project's CA and the operator's identity live."""
    return settings.mle_dir / "pki"


def ensure_ca(settings: Settings) -> Path:
    """The pki directory holding `ca.crt` and `ca.key` (0600), created on first need."""
    directory = pki_dir(settings)
    if (directory / "ca.crt").exists():  # written last: its key is there too
        return directory
    with _locked(directory):
        if not (directory / "ca.crt").exists():
            _create_ca(settings, directory)
    return directory


def operator_identity(settings: Settings) -> TlsIdentity:
    """The CA and the operator's client key and certificate, created on first need."""
    directory = ensure_ca(settings)
    ca_pem = _read(directory / "ca.crt")
    with _locked(directory):  # a renewal replaces key and certificate: read them as a pair
        if not _operator_usable(directory, ca_pem):
            _issue_operator(settings, directory)
        key = _read(directory / "operator.key")
        cert = _read(directory / "operator.crt")
    return TlsIdentity(ca=ca_pem, key=key, cert=cert)


def sign_agent_csr(
    settings: Settings, csr_pem: bytes, name: str, addresses: Sequence[str] = ()
) -> bytes:
    """A certificate (PEM) for an agent's CSR: `name` and `addresses` in its SAN.

    Only the CSR's public key is used (after its signature is checked): the name and addresses
    are what the operator vouches for, whatever else the request asks."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    check_agent_name(name)
    alt_names = _alt_names(name, addresses)
    csr = _load_csr(csr_pem, name)
    ca_cert, ca_key = _load_ca(ensure_ca(settings))
    builder = _leaf(ca_cert, csr.public_key(), name, AGENT_CERT_DAYS)
    builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    # Server use only: an agent's certificate must never open a call to another agent.
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    builder = builder.add_extension(usage, critical=False)
    cert = builder.sign(ca_key, _sha256())
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SignedAgent:
    """The files `sign_agent_request` wrote for an agent."""

    name: str
    cert: Path
    ca: Path
    fingerprint: str

    def agentd_flags(self, key: str | None = None) -> list[str]:
        """The `mle-agentd` flags that use these files; without `key`, the agent takes the key
        `--make-csr` left in its data dir."""
        flags = ["--name", self.name, "--tls-cert", str(self.cert), "--tls-ca", str(self.ca)]
        return flags if key is None else [*flags, "--tls-key", key]


def sign_agent_request(
    settings: Settings,
    csr_path: Path,
    name: str,
    addresses: Sequence[str] = (),
    out_dir: Path | None = None,
) -> SignedAgent:
    """Sign the CSR in a file; write `<name>.crt` and the project's `ca.crt` into `out_dir`
    (default: next to the CSR)."""
    out = (out_dir or csr_path.parent).absolute()  # the flags printed must work from anywhere
    if out.resolve() == pki_dir(settings).resolve():
        raise InvalidInput(f"write agent certificates elsewhere than {pki_dir(settings)}")
    if name == "ca":
        raise InvalidInput("an agent named 'ca' would overwrite ca.crt; give it another name")
    try:
        csr_pem = csr_path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read {csr_path}: {exc.strerror or exc}") from None
    cert_pem = sign_agent_csr(settings, csr_pem, name, addresses)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MleError(f"cannot create {out}: {exc.strerror or exc}") from None
    cert, ca = out / f"{name}.crt", out / "ca.crt"
    write_file(cert, cert_pem, private=False)
    write_file(ca, _read(ensure_ca(settings) / "ca.crt"), private=False)
    return SignedAgent(name, cert, ca, certificate_fingerprint(cert_pem))


def issue_server_certificate(
    settings: Settings, common_name: str, alt_names: Sequence[x509.GeneralName], days: int
) -> tuple[bytes, bytes]:
    """A fresh key and a server-only certificate the project CA issues for it (PEM each)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = _new_key()
    ca_cert, ca_key = _load_ca(ensure_ca(settings))
    builder = _leaf(ca_cert, key.public_key(), common_name, days)
    builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    cert = builder.add_extension(usage, critical=False).sign(ca_key, _sha256())
    return _cert_pem(cert), _key_pem(key)


def certificate_fingerprint(cert_pem: bytes) -> str:
    """`sha256:<hex>` of the certificate's DER (what agents put in their mDNS record)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidInput("not a PEM certificate") from None
    der = cert.public_bytes(serialization.Encoding.DER)
    return f"sha256:{hashlib.sha256(der).hexdigest()}"


def check_agent_name(name: str) -> None:
    """Refuse a name that is not a valid target name (it becomes the certificate's DNS name)."""
    if not NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid agent name {name[:80]!r}: a target name is 1 to 63 letters, digits, "
            "'.', '_' or '-', starting with a letter or digit"
        )
    if ".." in name:  # an empty DNS label: TLS cannot check such a host name
        raise InvalidInput(f"invalid agent name {name!r} for a certificate: '..' in a row")


def _create_ca(settings: Settings, directory: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    key = _new_key()
    label = f"mle project CA {settings.project_dir.name}"[:_CN_MAX]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    cert = builder.sign(key, _sha256())
    write_file(directory / "ca.key", _key_pem(key), private=True)
    write_file(directory / "ca.crt", _cert_pem(cert), private=False)  # last: it marks the CA done


def _issue_operator(settings: Settings, directory: Path) -> None:
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    label = f"{OPERATOR_CN_PREFIX}{settings.project_dir.name}"[:_CN_MAX]
    builder = _leaf(ca_cert, key.public_key(), label, OPERATOR_CERT_DAYS, unit=OPERATOR_OU)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    cert = builder.add_extension(usage, critical=False).sign(ca_key, _sha256())
    write_file(directory / "operator.key", _key_pem(key), private=True)
    write_file(directory / "operator.crt", _cert_pem(cert), private=False)


def _operator_usable(directory: Path, ca_pem: bytes) -> bool:
    """Whether the operator certificate exists, is from this CA and is not about to expire."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate((directory / "operator.crt").read_bytes())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
        key_pem = (directory / "operator.key").read_bytes()
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (OSError, ValueError, TypeError, InvalidSignature):  # absent, damaged, other CA
        return False
    paired = key.public_key() == cert.public_key()
    return paired and cert.not_valid_after_utc - _now() > _RENEW_BEFORE


def _leaf(
    ca_cert: x509.Certificate, public_key: Any, name: str, days: int, unit: str = ""
) -> x509.CertificateBuilder:
    """A certificate builder for an end entity named `name` (in organizational `unit`, if
    given), issued by the CA."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = _now()
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    subject = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    if unit:
        subject.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _alt_names(name: str, addresses: Sequence[str]) -> list[x509.GeneralName]:
    """DNS:name, then each address as an IP or a DNS entry; refuse anything else."""
    from cryptography import x509

    entries: dict[str, x509.GeneralName] = {name.lower(): x509.DNSName(name)}
    with contextlib.suppress(ValueError):  # a name that reads as an IP is checked as one
        entries[f"ip:{name}"] = x509.IPAddress(ipaddress.ip_address(name))
    for address in addresses:
        text = address.strip().removeprefix("[").removesuffix("]")
        try:
            entries.setdefault(f"ip:{text}", x509.IPAddress(ipaddress.ip_address(text)))
            continue
        except ValueError:
            pass
        labels = text.removesuffix(".").split(".")
        if len(text) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise InvalidInput(f"invalid address {address[:80]!r}: expected an IP or a host name")
        entries.setdefault(text.lower(), x509.DNSName(text))
    return list(entries.values())


def _load_csr(csr_pem: bytes, name: str) -> x509.CertificateSigningRequest:
    """The CSR, its signature checked, its key strong enough, asking for `name` (if anything)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidInput("not a PEM certificate signing request") from None
    try:  # a curve or algorithm this OpenSSL does not know (e.g. secp112r1) is refused too
        valid = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise InvalidInput(_WEAK_KEY) from None
    if not valid:
        raise InvalidInput("the certificate signing request's signature does not verify")
    strong = (isinstance(key, ec.EllipticCurvePublicKey) and key.curve.key_size >= 256) or (
        isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048
    )
    if not strong:
        raise InvalidInput(_WEAK_KEY)
    asked = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if asked and asked != [name]:
        raise InvalidInput(f"the request is for agent {str(asked[0])[:80]!r}, not {name!r}")
    return csr


def _load_ca(directory: Path) -> tuple[x509.Certificate, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read(directory / "ca.crt"), _read(directory / "ca.key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise MleError(
            f"the project CA in {directory} is damaged; restore it from a backup"
        ) from None
    return cert, key


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MleError(f"cannot read {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the pki directory's lock (created 0700 on first use) while the block runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
    except OSError as exc:
        raise MleError(f"cannot use {directory}: {exc.strerror or exc}") from None
    with lock_file(directory / ".lock"):
        yield
