"""Authentication and transport security of a real in-process agent: bearer token, mutual TLS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mle_agent.server import create_server
from mle_agent.tasks import TaskManager
from mle_proto.errors import UsageError
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_helpers import (
    Agent,
    agent_settings,
    digest_of,
    leak_check,
    put_chunks,
    run,
    running_agent,
)

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cret-token-for-tests"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


async def _unary(call: Callable[..., Any], request: Any, md: Any) -> None:
    await call(request, metadata=md)


async def _stream(call: Callable[..., Any], request: Any, md: Any) -> None:
    async for _ in call(request, metadata=md):
        pass


async def _put_headers_only(call: Callable[..., Any], md: Any) -> None:
    # The refusal comes at the headers, before any message. A client still writing chunks when it
    # arrives may see grpc's own "Internal error from Core" instead, so send none here.
    await call(metadata=md)


def _calls(agent: Agent, *, refused: bool) -> dict[str, Callable[[Any], Any]]:
    """One call per method of every service, each taking the metadata to send."""
    a, s = agent.agent, agent.artifacts
    health = health_pb2_grpc.HealthStub(agent.channel)
    spec = pb.TaskSpec(task_id="r.auth.1", shell="true")
    check = health_pb2.HealthCheckRequest()
    return {
        "GetInfo": lambda md: _unary(a.GetInfo, pb.GetInfoRequest(), md),
        "StartTask": lambda md: _unary(a.StartTask, spec, md),
        "WatchTask": lambda md: _stream(a.WatchTask, pb.WatchTaskRequest(task_id="x"), md),
        "RunTask": lambda md: _stream(a.RunTask, pb.TaskSpec(task_id="r.run.1", shell="true"), md),
        "CancelTask": lambda md: _unary(a.CancelTask, pb.CancelTaskRequest(task_id="x"), md),
        "ListTasks": lambda md: _unary(a.ListTasks, pb.ListTasksRequest(), md),
        "Ack": lambda md: _unary(a.Ack, pb.AckRequest(task_id="x"), md),
        "Heartbeat": lambda md: _stream(a.Heartbeat, pb.HeartbeatRequest(), md),
        "Stat": lambda md: _unary(s.Stat, pb.StatRequest(), md),
        "Put": (
            (lambda md: _put_headers_only(s.Put, md))
            if refused
            else (lambda md: _unary(s.Put, put_chunks(b"data", 2), md))
        ),
        "Get": lambda md: _stream(s.Get, pb.GetRequest(digest=digest_of(b"x")), md),
        "Health.Check": lambda md: _unary(health.Check, check, md),
        "Health.Watch": lambda md: _stream(health.Watch, check, md),
    }


@pytest.mark.parametrize(
    "metadata",
    [
        (),
        (("authorization", "Bearer wrong"),),
        (("authorization", TOKEN),),
        (("authorization", f"Bearer {TOKEN}x"),),
        (("x-token", f"Bearer {TOKEN}"),),
    ],
    ids=["missing", "wrong", "no-scheme", "longer", "other-header"],
)
def test_every_method_refuses_a_missing_or_wrong_token(
    tmp_path: Path, metadata: tuple[tuple[str, str], ...]
) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            for name, call in _calls(agent, refused=True).items():
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(metadata)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                assert info.value.details() == "missing or wrong token", name
            listed = await agent.agent.ListTasks(pb.ListTasksRequest(), metadata=agent.metadata)
            assert list(listed.tasks) == []  # the refused StartTask created nothing
            assert _store_is_empty(agent)

    run(scenario())


def test_the_right_token_is_accepted_everywhere(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            calls = _calls(agent, refused=False)
            for service in ("Agent", "Artifacts"):  # a new method gets a case above
                methods = pb.DESCRIPTOR.services_by_name[service].methods
                assert {m.name for m in methods} <= set(calls), service
            for name in ("GetInfo", "StartTask", "ListTasks", "Stat", "Put", "Health.Check"):
                await calls[name](agent.metadata)
            assert (await agent.result("r.auth.1")).state == pb.TASK_STATE_SUCCEEDED
            assert await agent.health_status("mle.v1.Agent") == 1  # SERVING

    run(scenario())


def _store_is_empty(agent: Agent) -> bool:
    return not [p for p in agent.settings.artifacts_root.rglob("*") if p.is_file()]


def test_create_server_refuses_a_public_address_without_tls(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path, listen="0.0.0.0:0")

    async def scenario() -> None:
        manager = TaskManager.open(settings)
        try:
            with pytest.raises(UsageError) as info:
                await create_server(settings, manager)
            assert str(info.value) == (
                "refusing to listen on 0.0.0.0:0 without TLS; give --tls-cert/--tls-key/--tls-ca,"
                " or --insecure to accept the risk"
            )
        finally:
            manager.close()

    run(scenario())


def test_a_second_agent_cannot_share_a_data_dir(tmp_path: Path) -> None:
    settings = agent_settings(tmp_path)
    first = TaskManager.open(settings)
    try:
        with pytest.raises(Exception, match="is in use by another agent"):
            TaskManager.open(settings)
    finally:
        first.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> None:
    """A CA, a server certificate for 127.0.0.1, and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=mle test ca", cwd=d)  # fmt: skip
    # the client is the operator: agents take calls from the operator's certificate alone
    for name, cn, ext in (("server", "mle server", "subjectAltName=IP:127.0.0.1"),
                          ("client", "mle operator test", "")):  # fmt: skip
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
        extfile = d / f"{name}.ext"
        extfile.write_text(f"{ext}\n" if ext else "basicConstraints=CA:FALSE\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
                 "-extfile", str(extfile), cwd=d)  # fmt: skip


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    settings = replace(
        agent_settings(tmp_path),
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_ca=pki / "ca.crt",
    )
    ca = (pki / "ca.crt").read_bytes()

    async def call(credentials: grpc.ChannelCredentials, port: int) -> pb.AgentInfo:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            stub = pb_grpc.AgentStub(channel)
            return await stub.GetInfo(pb.GetInfoRequest(), timeout=10)

    async def scenario() -> None:
        async with running_agent(settings) as agent:
            with_cert = grpc.ssl_channel_credentials(
                ca, (pki / "client.key").read_bytes(), (pki / "client.crt").read_bytes()
            )
            assert (await call(with_cert, agent.port)).name == "test-agent"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(grpc.ssl_channel_credentials(ca), agent.port)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    run(scenario())
