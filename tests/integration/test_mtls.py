"""Mutual TLS between the operator and real in-process agents on 127.0.0.1, with certificates from
the project PKI: who the agent refuses, who the operator refuses, and what the user reads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import zeroconf
from cryptography import x509

from mle_agent.announce import announced
from mle_cli.settings import Settings
from mle_cli.targets._endpoint import Endpoint, TlsIdentity
from mle_cli.targets.connection import AgentConnection, connect
from mle_cli.targets.discovery import discover_agents
from mle_cli.targets.pki import ensure_ca, operator_identity
from mle_proto.errors import AgentUnavailable, MleError, Unauthenticated
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_helpers import agent_settings, leak_check, run, running_agent
from tests.pki_helpers import (
    AgentTls,
    client_identity,
    expired_agent_tls,
    issue_agent_tls,
    tls_endpoint,
)

pytestmark = pytest.mark.timeout(90)
LOOPBACK = "127.0.0.1"
REFUSED = "agent pi-01 refused this operator's certificate: "


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture(autouse=True)
def _no_key_in_output(caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> Any:
    """No private key text in any log record, nor in what grpc's core wrote to stdout/stderr."""
    caplog.set_level(logging.DEBUG)
    yield
    out, err = capfd.readouterr()
    assert "PRIVATE KEY" not in caplog.text + out + err


@pytest.fixture
def lab(tmp_path: Path) -> Settings:
    return Settings(project_dir=tmp_path / "lab")


@pytest.fixture
def elsewhere(tmp_path: Path) -> Settings:
    """Another project, with a CA of its own."""
    return Settings(project_dir=tmp_path / "elsewhere")


@contextlib.asynccontextmanager
async def _agent(tmp_path: Path, tls: AgentTls, **overrides: Any) -> AsyncIterator[str]:
    """A TLS agent on 127.0.0.1:0 serving with `tls`; its address."""
    settings = tls.apply(agent_settings(tmp_path / f"agent-{time.monotonic_ns()}", **overrides))
    async with running_agent(settings) as agent:
        yield f"{LOOPBACK}:{agent.port}"


async def _raw_info(tls: TlsIdentity, address: str) -> pb.AgentInfo:
    """GetInfo through grpc alone (no check of ours first), as any client would call."""
    credentials = grpc.ssl_channel_credentials(tls.ca, tls.key or None, tls.cert or None)
    options = [("grpc.ssl_target_name_override", "pi-01")]
    async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
        return await pb_grpc.AgentStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)


async def _info(endpoint: Endpoint) -> pb.AgentInfo:
    """What the operator does: connect (identity checked), then GetInfo."""
    conn = await connect(endpoint, rpc_timeout=10)
    try:
        return await conn.info()
    finally:
        await conn.close()


async def _refusal(call: Coroutine[Any, Any, Any], kind: type[MleError] = Unauthenticated) -> str:
    """The one line the user reads when `call` is refused."""
    with pytest.raises(kind) as info:
        await call
    error = info.value
    assert "\n" not in error.message and "PRIVATE KEY" not in f"{error.message}{error.hint}"
    return error.message


def _clients(lab: Settings, elsewhere: Settings) -> dict[str, tuple[TlsIdentity, str]]:
    """Client identities trusting the lab's CA, and what the operator is told for each."""
    pki = ensure_ca(lab)
    ca = (pki / "ca.crt").read_bytes()
    expired = client_identity(
        ca, issuer_cert=pki / "ca.crt", issuer_key=pki / "ca.key", expired=True
    )
    ended = x509.load_pem_x509_certificate(expired.cert).not_valid_after_utc
    foreign = operator_identity(elsewhere)
    return {
        "no certificate": (
            TlsIdentity(ca, b"", b""),
            REFUSED + "this operator presents no client certificate",
        ),
        "self-signed": (
            client_identity(ca),
            REFUSED + "this operator's certificate is not issued by the project CA",
        ),
        "another CA": (
            replace(foreign, ca=ca),
            REFUSED + "this operator's certificate is not issued by the project CA",
        ),
        "expired": (expired, REFUSED + f"this operator's certificate expired on {ended:%Y-%m-%d}"),
        "valid": (operator_identity(lab), ""),
    }


def test_only_a_client_certificate_from_the_project_ca_gets_in(
    tmp_path: Path, lab: Settings, elsewhere: Settings
) -> None:
    clients = _clients(lab, elsewhere)

    async def scenario() -> None:
        async with _agent(tmp_path, issue_agent_tls(lab, "pi-01")) as address:
            for case, (tls, message) in clients.items():
                endpoint = Endpoint("pi-01", address, tls=tls)
                if case == "valid":
                    assert (await _raw_info(tls, address)).name == "pi-01"
                    assert (await _info(endpoint)).name == "pi-01"
                    continue
                with pytest.raises(grpc.aio.AioRpcError) as raw:
                    await _raw_info(tls, address)
                assert raw.value.code() == grpc.StatusCode.UNAVAILABLE, case
                assert await _refusal(_info(endpoint)) == message, case

    run(scenario())


def test_an_agent_trusting_another_ca_refuses_the_operator(
    tmp_path: Path, lab: Settings, elsewhere: Settings
) -> None:
    tls = issue_agent_tls(lab, "pi-01")
    foreign_ca = ensure_ca(elsewhere) / "ca.crt"

    async def scenario() -> None:
        async with _agent(tmp_path, replace(tls, ca=foreign_ca)) as address:
            message = await _refusal(_info(tls_endpoint(lab, "pi-01", address)))
            assert message == REFUSED + "it trusts another CA than this project's"

    run(scenario())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("another CA", "agent pi-01 presented a certificate not issued by this project's CA"),
        ("another name", "agent pi-01 presented a certificate issued for another name, not pi-01"),
        ("expired", "agent pi-01 presented an expired certificate"),
    ],
)
def test_the_operator_refuses_an_agent_it_cannot_trust(
    tmp_path: Path, lab: Settings, elsewhere: Settings, case: str, message: str
) -> None:
    agents = {
        "another CA": lambda: issue_agent_tls(elsewhere, "pi-01"),
        "another name": lambda: issue_agent_tls(lab, "pi-02"),
        "expired": lambda: expired_agent_tls(lab, "pi-01", tmp_path / "expired"),
    }
    tls = agents[case]()

    async def scenario() -> None:
        async with _agent(tmp_path, tls) as address:
            endpoint = tls_endpoint(lab, "pi-01", address)
            assert await _refusal(_info(endpoint)) == f"{message}; refusing it"
            # grpc's channel checks the CA and the name too, should anything skip our check
            conn = AgentConnection(endpoint, rpc_timeout=10)
            try:
                await _refusal(conn.info(), AgentUnavailable)
            finally:
                await conn.close()

    run(scenario())


def test_connect_and_info_over_mutual_tls(tmp_path: Path, lab: Settings) -> None:
    tls = issue_agent_tls(lab, "pi-01")

    async def scenario() -> None:
        async with _agent(tmp_path, tls, labels={"role": "edge"}) as address:
            endpoint = tls_endpoint(lab, "pi-01", address, fingerprint=tls.fingerprint)
            assert "PRIVATE KEY" not in repr(endpoint)
            conn = await connect(endpoint, rpc_timeout=10)
            try:
                info = await conn.info()
                assert (info.name, dict(info.labels)) == ("pi-01", {"role": "edge"})
                assert await conn.missing(["sha256:" + "0" * 64]) == ["sha256:" + "0" * 64]
            finally:
                await conn.close()

    run(scenario())


def test_an_agent_that_is_down_is_unavailable_not_untrusted(tmp_path: Path, lab: Settings) -> None:
    tls = issue_agent_tls(lab, "pi-01")

    async def scenario() -> None:
        async with _agent(tmp_path, tls) as address:
            pass  # stopped: nothing listens there any more
        message = await _refusal(_info(tls_endpoint(lab, "pi-01", address)), AgentUnavailable)
        assert message == "agent pi-01: unreachable (connection refused)"

    run(scenario())


def test_an_agent_without_tls_is_not_trusted(tmp_path: Path, lab: Settings) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path, name="pi-01")) as agent:
            address = f"{LOOPBACK}:{agent.port}"
            with pytest.raises(Unauthenticated) as info:
                await _info(tls_endpoint(lab, "pi-01", address))
            # the reason in parentheses is OpenSSL's (here "wrong version number")
            expected = f"agent pi-01 at {address} did not complete a TLS handshake ("
            assert info.value.message.startswith(expected)
            assert info.value.hint == "is it started with --tls-cert, --tls-key and --tls-ca?"

    run(scenario())


# mDNS: the agent's record carries its certificate's fingerprint; a record copied by someone else
# and pointing at another machine (whose certificate passes CA and name) is refused.


@pytest.fixture
def _fast_mdns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter probe and announce intervals, as python-zeroconf's own tests do."""
    for name, millis in (("_CHECK_TIME", 10), ("_REGISTER_TIME", 10), ("_UNREGISTER_TIME", 10)):
        monkeypatch.setattr(zeroconf._core, name, millis)


def _discovered_endpoint(lab: Settings, name: str, timeout: float = 20.0) -> Endpoint:
    """Browse mDNS on loopback until `name` is seen; the endpoint its record describes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [a for a in discover_agents(1.0, LOOPBACK).agents if a.name == name]
        if found:
            return tls_endpoint(lab, name, found[0].endpoint, found[0].fingerprint)
    raise AssertionError(f"{name} was not discovered within {timeout}s")


@pytest.mark.usefixtures("_fast_mdns")
def test_an_agent_found_by_mdns_is_trusted_by_its_fingerprint(
    tmp_path: Path, lab: Settings
) -> None:
    name = f"pi-{time.monotonic_ns() % 10**9}"
    tls = issue_agent_tls(lab, name)
    settings = tls.apply(agent_settings(tmp_path, announce=True, announce_interfaces=LOOPBACK))

    async def scenario() -> None:
        async with running_agent(settings) as agent, announced(settings, agent.port):
            endpoint = await asyncio.to_thread(_discovered_endpoint, lab, name)
            assert endpoint.fingerprint == tls.fingerprint
            assert (await _info(endpoint)).name == name

    run(scenario())


@pytest.mark.usefixtures("_fast_mdns")
def test_a_spoofed_mdns_record_is_refused(tmp_path: Path, lab: Settings) -> None:
    name = f"pi-{time.monotonic_ns() % 10**9}"
    genuine = issue_agent_tls(lab, name, out_dir=tmp_path / "genuine")
    impostor = issue_agent_tls(lab, name, out_dir=tmp_path / "impostor")  # e.g. an old device
    record = genuine.apply(agent_settings(tmp_path, announce=True, announce_interfaces=LOOPBACK))

    async def scenario() -> None:
        async with _agent(tmp_path, impostor) as address:
            port = int(address.rpartition(":")[2])
            # the genuine agent's record (its fingerprint), pointing at the impostor's port
            async with announced(record, port):
                endpoint = await asyncio.to_thread(_discovered_endpoint, lab, name)
            assert endpoint.address == address
            message = await _refusal(_info(endpoint))
            assert message == (
                f"agent {name} presented certificate {impostor.fingerprint[:23]}… but its mDNS "
                f"record says {genuine.fingerprint[:23]}…; refusing it"
            )

    run(scenario())
