"""The project PKI (`.mle/pki/`) and the agent's key and CSR: real keys and certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mle_agent import identity
from mle_agent.announce import certificate_fingerprint as agent_fingerprint
from mle_agent.identity import agent_csr
from mle_agent.settings import AgentSettings
from mle_cli.settings import Settings
from mle_cli.targets import pki, selectors
from mle_proto.errors import InvalidInput, UsageError
from tests.pki_helpers import issue_agent_tls

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(project_dir=tmp_path / "lab")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def _csr(tmp_path: Path, name: str = "pi-01", addresses: tuple[str, ...] = ()) -> bytes:
    return agent_csr(tmp_path / "device" / "agent.key", name, addresses)


def test_the_ca_is_created_once_with_private_modes(settings: Settings) -> None:
    directory = pki.ensure_ca(settings)
    first = (directory / "ca.crt").read_bytes()
    assert pki.ensure_ca(settings) == directory == settings.project_dir / ".mle" / "pki"
    assert (directory / "ca.crt").read_bytes() == first
    assert _mode(directory) == 0o700
    assert _mode(directory / "ca.key") == 0o600
    ca = _cert(first)
    assert ca.subject.rfc4514_string() == "CN=mle project CA lab"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert datetime.timedelta(days=3650) <= lifetime <= datetime.timedelta(days=3651)


def test_processes_racing_to_create_the_ca_make_one(settings: Settings) -> None:
    code = (
        "import sys; from pathlib import Path; from mle_cli.settings import Settings; "
        "from mle_cli.targets.pki import ensure_ca, certificate_fingerprint as f; "
        "d = ensure_ca(Settings(project_dir=Path(sys.argv[1]))); "
        "print(f((d / 'ca.crt').read_bytes()))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("cli", "protos"))}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(settings.project_dir)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    printed = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert [racer.returncode for racer in racers] == [0, 0, 0, 0]
    ca = (pki.pki_dir(settings) / "ca.crt").read_bytes()
    assert printed == {pki.certificate_fingerprint(ca)}
    assert sorted(p.name for p in pki.pki_dir(settings).iterdir()) == [".lock", "ca.crt", "ca.key"]


def test_the_operator_identity_is_a_client_certificate_from_the_ca(settings: Settings) -> None:
    tls = pki.operator_identity(settings)
    directory = pki.pki_dir(settings)
    assert tls.ca == (directory / "ca.crt").read_bytes()
    assert _mode(directory / "operator.key") == 0o600
    cert = _cert(tls.cert)
    cert.verify_directly_issued_by(_cert(tls.ca))
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert pki.operator_identity(settings) == tls  # made once
    assert "PRIVATE KEY" not in repr(tls)


def test_an_expiring_operator_certificate_is_renewed(settings: Settings) -> None:
    tls = pki.operator_identity(settings)
    directory = pki.pki_dir(settings)
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    old = _cert(tls.cert)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(old.subject)
        .issuer_name(old.issuer)
        .public_key(old.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=700))
        .not_valid_after(now + datetime.timedelta(days=2))
    )
    ending = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    (directory / "operator.crt").write_bytes(ending.public_bytes(serialization.Encoding.PEM))
    renewed = pki.operator_identity(settings)
    assert renewed.cert != tls.cert and renewed.key != tls.key
    assert _cert(renewed.cert).not_valid_after_utc > now + datetime.timedelta(days=700)


def test_an_agent_certificate_carries_its_name_and_addresses(
    settings: Settings, tmp_path: Path
) -> None:
    csr = _csr(tmp_path, "pi-01", ("10.0.0.9",))
    pem = pki.sign_agent_csr(settings, csr, "pi-01", ["192.168.1.50", "pi-01.local", "[::1]"])
    cert = _cert(pem)
    cert.verify_directly_issued_by(_cert((pki.pki_dir(settings) / "ca.crt").read_bytes()))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pi-01"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pi-01", "pi-01.local"]
    # the operator vouches for the addresses it was given, not those the request asked for
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.168.1.50"),
        ipaddress.ip_address("::1"),
    ]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]  # never a client of another agent
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=730) <= lifetime <= datetime.timedelta(days=731)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_a_request_with_a_bad_signature_is_refused(settings: Settings, tmp_path: Path) -> None:
    der = bytearray(x509.load_pem_x509_csr(_csr(tmp_path)).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidInput) as info:
        pki.sign_agent_csr(settings, tampered, "pi-01")
    assert info.value.message == "the certificate signing request's signature does not verify"


@pytest.mark.parametrize(
    ("request_pem", "message"),
    [
        (b"garbage", "not a PEM certificate signing request"),
        (b"", "not a PEM certificate signing request"),
    ],
)
def test_a_request_that_is_not_a_csr_is_refused(
    settings: Settings, request_pem: bytes, message: str
) -> None:
    with pytest.raises(InvalidInput, match=f"^{message}$"):
        pki.sign_agent_csr(settings, request_pem, "pi-01")


def test_a_request_for_another_name_or_with_a_weak_key_is_refused(
    settings: Settings, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput) as info:
        pki.sign_agent_csr(settings, _csr(tmp_path, "pi-02"), "pi-01")
    assert info.value.message == "the request is for agent 'pi-02', not 'pi-01'"
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi-01")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(weak, hashes.SHA256())
    with pytest.raises(InvalidInput, match="not ECDSA P-256/P-384 or RSA of 2048"):
        pki.sign_agent_csr(settings, csr.public_bytes(serialization.Encoding.PEM), "pi-01")


# secp112r1, made with `openssl ecparam -name secp112r1`: cryptography parses the request but
# cannot use its key (UnsupportedAlgorithm), which must not become a traceback.
_SECP112R1_CSR = b"""-----BEGIN CERTIFICATE REQUEST-----
MH8wSwIBADAQMQ4wDAYDVQQDDAVwaS0wMTAyMBAGByqGSM49AgEGBSuBBAAGAx4A
BG5RPADNFKXyWBytSpS7t68hKTiBqVqhCrlLHc6gADAKBggqhkjOPQQDAgMkADAh
Ag8AmOlYXly7EmGxB6UqBpICDm9obS4e2SYHIWSRn2DP
-----END CERTIFICATE REQUEST-----
"""


def test_a_request_with_a_curve_cryptography_cannot_use_is_refused(settings: Settings) -> None:
    with pytest.raises(InvalidInput) as info:
        pki.sign_agent_csr(settings, _SECP112R1_CSR, "pi-01")
    assert info.value.message == "the request's key is not ECDSA P-256/P-384 or RSA of 2048+ bits"


@pytest.mark.parametrize("name", ["pi 01", "-pi", "", "a" * 64, "pi/01", "pi-01\n", "ca*"])
def test_a_name_that_is_not_a_target_name_is_refused(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        pki.sign_agent_csr(settings, _csr(tmp_path, "pi-01"), name)
    assert info.value.message == (
        f"invalid agent name {name!r}: a target name is 1 to 63 letters, digits, '.', '_' or "
        "'-', starting with a letter or digit"
    )
    assert not pki.pki_dir(settings).exists()  # refused before any CA is made


@pytest.mark.parametrize("address", ["bad host", "a..b", "-x.lan", "1.2.3.4/24", "x" * 64])
def test_an_address_that_is_neither_ip_nor_host_is_refused(
    settings: Settings, tmp_path: Path, address: str
) -> None:
    with pytest.raises(InvalidInput, match="expected an IP or a host name"):
        pki.sign_agent_csr(settings, _csr(tmp_path), "pi-01", [address])


def test_the_fingerprint_equals_the_one_the_agent_announces(
    settings: Settings, tmp_path: Path
) -> None:
    tls = issue_agent_tls(settings, "pi-01", out_dir=tmp_path / "device")
    announced = agent_fingerprint(AgentSettings(tls_cert=tls.cert))
    assert announced == tls.fingerprint == pki.certificate_fingerprint(tls.cert.read_bytes())
    assert announced.startswith("sha256:") and len(announced) == len("sha256:") + 64


def test_the_agent_key_is_made_once_and_stays_private(tmp_path: Path) -> None:
    key_path = tmp_path / "device" / "agent.key"
    key_path.parent.mkdir()
    first = x509.load_pem_x509_csr(agent_csr(key_path, "pi-01", ["10.0.0.9", "pi-01.lan"]))
    assert _mode(key_path) == 0o600
    again = x509.load_pem_x509_csr(agent_csr(key_path, "pi-01"))
    assert first.public_key() == again.public_key()
    assert first.is_signature_valid
    assert first.subject.rfc4514_string() == "CN=pi-01"
    san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["pi-01", "pi-01.lan"]
    assert b"PRIVATE KEY" not in agent_csr(key_path, "pi-01")


def test_the_agent_refuses_a_bad_name_or_an_unusable_key(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="invalid name 'pi 01' for a certificate"):
        agent_csr(tmp_path / "agent.key", "pi 01")
    assert not (tmp_path / "agent.key").exists()
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    with pytest.raises(UsageError) as info:
        agent_csr(garbage, "pi-01")
    assert info.value.message == f"{garbage} is not an unencrypted PEM private key"


def test_agent_and_operator_agree_on_what_a_name_is() -> None:
    assert identity.NAME.pattern == selectors.NAME.pattern


def test_an_operator_key_that_does_not_match_its_certificate_is_replaced(
    settings: Settings,
) -> None:
    tls = pki.operator_identity(settings)
    stray = ec.generate_private_key(ec.SECP256R1())
    key_file = pki.pki_dir(settings) / "operator.key"
    key_file.write_bytes(
        stray.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    renewed = pki.operator_identity(settings)
    assert renewed.cert != tls.cert
    key = serialization.load_pem_private_key(renewed.key, None)
    assert key.public_key() == _cert(renewed.cert).public_key()


def test_sign_agent_request_writes_the_certificate_and_the_ca(
    settings: Settings, tmp_path: Path
) -> None:
    csr = tmp_path / "pi-01.csr"
    csr.write_bytes(_csr(tmp_path))
    signed = pki.sign_agent_request(settings, csr, "pi-01", ["10.0.0.9"])
    assert (signed.cert, signed.ca) == (tmp_path / "pi-01.crt", tmp_path / "ca.crt")
    assert signed.ca.read_bytes() == (pki.pki_dir(settings) / "ca.crt").read_bytes()
    assert signed.fingerprint == pki.certificate_fingerprint(signed.cert.read_bytes())
    assert signed.agentd_flags("/data/agent.key") == [
        "--name", "pi-01",
        "--tls-cert", str(signed.cert),
        "--tls-ca", str(signed.ca),
        "--tls-key", "/data/agent.key",
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="write agent certificates elsewhere than"):
        pki.sign_agent_request(settings, csr, "operator", out_dir=pki.pki_dir(settings))
    with pytest.raises(InvalidInput, match=r"would overwrite ca\.crt"):
        pki.sign_agent_request(settings, csr, "ca")


@pytest.mark.parametrize(
    ("listen", "ips"),
    [("192.168.1.50:7443", ["192.168.1.50"]), ("0.0.0.0:7443", []), ("127.0.0.1:7443", [])],
)
def test_make_csr_asks_for_the_address_the_agent_listens_on(
    tmp_path: Path, listen: str, ips: list[str]
) -> None:
    settings = AgentSettings(name="pi-01", listen=listen, data_dir=tmp_path / "data")
    line = identity.make_csr(settings, tmp_path / "pi-01.csr")
    assert line.endswith("mle agent sign pi-01.csr --name pi-01 [--address IP]")
    csr = x509.load_pem_x509_csr((tmp_path / "pi-01.csr").read_bytes())
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ips
    assert _mode(tmp_path / "data" / "agent.key") == 0o600


def test_a_name_with_an_empty_dns_label_is_refused(settings: Settings, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as info:
        pki.sign_agent_csr(settings, _csr(tmp_path, "pi-01"), "a..b")
    assert info.value.message == "invalid agent name 'a..b' for a certificate: '..' in a row"
