"""Only the operator may call an agent: two real TLS agents enrolled in one project, and one
agent's certificate (as issued now, and as issued before: server and client use) presented as a
client to the other, over gRPC and over the REST/metrics listener."""

from __future__ import annotations

import asyncio
import datetime
import http.client
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mle_agent.identity import NOT_OPERATOR_MESSAGE, OPERATOR_CN_PREFIX
from mle_cli.settings import Settings
from mle_cli.targets import pki
from mle_cli.targets._endpoint import TlsIdentity
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_helpers import agent_settings, leak_check, run, running_agent
from tests.oip_helpers import serving_agent
from tests.pki_helpers import AgentTls, issue_agent_tls, key_pem

pytestmark = pytest.mark.timeout(90)
LOOPBACK = "127.0.0.1"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def _identity(tls: AgentTls) -> TlsIdentity:
    """An agent's own certificate and key, used as a client identity."""
    return TlsIdentity(tls.ca.read_bytes(), tls.key.read_bytes(), tls.cert.read_bytes())


def _old_style(settings: Settings, tls: AgentTls) -> TlsIdentity:
    """What the CA issued agents before: the same name and key, for server AND client use."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    directory = pki.ensure_ca(settings)
    ca_key = load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = load_pem_private_key(tls.key.read_bytes(), None)
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, tls.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(tls.name)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    return TlsIdentity(tls.ca.read_bytes(), key_pem(key), pem)  # type: ignore[arg-type]


async def _grpc_calls(
    tls: TlsIdentity, port: int, name: str, task_id: str = "r.intruder.1"
) -> list[grpc.StatusCode]:
    """GetInfo and StartTask as this client; the status of each (OK when answered), a refusal
    by the agent's own check saying why."""
    answers = await _grpc_answers(tls, port, name, task_id)
    for code, details in answers:
        assert code != grpc.StatusCode.PERMISSION_DENIED or details == NOT_OPERATOR_MESSAGE
    return [code for code, _ in answers]


async def _grpc_answers(
    tls: TlsIdentity, port: int, name: str, task_id: str
) -> list[tuple[grpc.StatusCode, str]]:
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    options = [("grpc.ssl_target_name_override", name)]
    answers = []
    async with grpc.aio.secure_channel(f"{LOOPBACK}:{port}", credentials, options) as channel:
        stub = pb_grpc.AgentStub(channel)
        spec = pb.TaskSpec(task_id=task_id, shell="id -u")
        for call, request in ((stub.GetInfo, pb.GetInfoRequest()), (stub.StartTask, spec)):
            try:
                await call(request, timeout=10)
                answers.append((grpc.StatusCode.OK, ""))
            except grpc.aio.AioRpcError as exc:
                answers.append((exc.code(), exc.details() or ""))
    return answers


async def _task_ids(tls: TlsIdentity, port: int, name: str) -> list[str]:
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key, tls.cert)
    options = [("grpc.ssl_target_name_override", name)]
    async with grpc.aio.secure_channel(f"{LOOPBACK}:{port}", credentials, options) as channel:
        listed = await pb_grpc.AgentStub(channel).ListTasks(pb.ListTasksRequest(), timeout=10)
    return [task.task_id for task in listed.tasks]


def _http_status(tls: TlsIdentity, port: int, path: str, tmp: Path) -> int | str:
    """GET `path` on the agent's REST listener as this client: the status, or "handshake"."""
    context = ssl.create_default_context(cadata=tls.ca.decode())
    both = tmp / f"client-{port}-{abs(hash(tls.cert))}.pem"
    both.write_bytes(tls.cert + tls.key)
    both.chmod(0o600)
    context.load_cert_chain(both)
    connection = http.client.HTTPSConnection(LOOPBACK, port, context=context, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        body = response.read()
        if response.status == 403:
            assert body == b'{"error": "' + NOT_OPERATOR_MESSAGE.encode() + b'"}'
        return response.status
    except (ssl.SSLError, ConnectionError):  # TLS itself refused the certificate
        return "handshake"
    finally:
        connection.close()


def test_an_agent_certificate_cannot_call_another_agent(tmp_path: Path) -> None:
    lab = Settings(project_dir=tmp_path / "lab")
    pi01, pi02 = issue_agent_tls(lab, "pi-01"), issue_agent_tls(lab, "pi-02")
    operator = pki.operator_identity(lab)
    clients = {"pi-01": _identity(pi01), "pi-01 old-style": _old_style(lab, pi01)}

    async def scenario() -> None:
        first = pi01.apply(agent_settings(tmp_path / "a1"))
        second = pi02.apply(agent_settings(tmp_path / "a2", http_listen=f"{LOOPBACK}:0"))
        async with running_agent(first) as a1, serving_agent(second) as a2:
            for port, name in ((a1.port, "pi-01"), (a2.port, "pi-02")):
                codes = await _grpc_calls(operator, port, name, "r.operator.1")
                assert codes == [grpc.StatusCode.OK] * 2
            # pi-02's certificate against pi-01, and pi-01's against pi-02
            for code in await _grpc_calls(_identity(pi02), a1.port, "pi-01"):
                assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
            for case, tls in clients.items():
                codes = await _grpc_calls(tls, a2.port, "pi-02")
                if case.endswith("old-style"):  # TLS accepts it: the agent's own check refuses
                    assert codes == [grpc.StatusCode.PERMISSION_DENIED] * 2, case
                for code in codes:
                    assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE)
            for port, name in ((a1.port, "pi-01"), (a2.port, "pi-02")):
                # the refused StartTask calls created nothing
                assert await _task_ids(operator, port, name) == ["r.operator.1"]
            await asyncio.to_thread(_check_http, operator, clients, a2.http_port, tmp_path)

    run(scenario())


def _check_http(
    operator: TlsIdentity, clients: dict[str, TlsIdentity], port: int, tmp: Path
) -> None:
    for path in ("/v2/health/live", "/metrics"):
        assert _http_status(operator, port, path, tmp) == 200, path
        assert _http_status(clients["pi-01 old-style"], port, path, tmp) == 403, path
        assert _http_status(clients["pi-01"], port, path, tmp) in (403, "handshake"), path


def test_agent_certificates_are_for_servers_and_the_operator_is_marked(tmp_path: Path) -> None:
    lab = Settings(project_dir=tmp_path / "lab")
    agent = x509.load_pem_x509_certificate(issue_agent_tls(lab, "pi-01").cert.read_bytes())
    usage = agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.SERVER_AUTH]
    operator = x509.load_pem_x509_certificate(pki.operator_identity(lab).cert)
    usage = operator.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cn = operator.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "mle operator lab"
    unit = operator.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert [u.value for u in unit] == [pki.OPERATOR_OU]
    assert OPERATOR_CN_PREFIX == pki.OPERATOR_CN_PREFIX  # the agent checks what the CA writes
