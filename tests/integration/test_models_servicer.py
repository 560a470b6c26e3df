"""The mle.v1.Models service over real gRPC on loopback, next to the agent's other services."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from mle_agent.servicers import AgentServicer, ArtifactsServicer
from mle_agent.serving.loadcheck import FAULT_ENV, RELEASE_ENV
from mle_agent.serving.registry import ADMIN_THREADS, ModelRegistry
from mle_agent.serving.servicer import ModelsServicer
from mle_agent.tasks import TaskManager
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from mle_proto.v1 import inference_pb2 as ipb
from tests.agent_helpers import Agent, digest_of, leak_check, put_chunks, run
from tests.integration._serving import FP32, INT8, MODELS, registry_settings
from tests.oip_helpers import serving_agent as oip_agent


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@contextlib.asynccontextmanager
async def serving_agent(tmp_path: Path) -> AsyncIterator[tuple[Agent, Any]]:
    """An in-process agent whose gRPC server also carries the Models service; its Models stub."""
    settings = registry_settings(tmp_path)
    manager = TaskManager.open(settings)
    registry = ModelRegistry(settings, manager.store)
    server = grpc.aio.server()
    try:
        await asyncio.to_thread(registry.start)
        pb_grpc.add_AgentServicer_to_server(AgentServicer(manager), server)
        pb_grpc.add_ArtifactsServicer_to_server(ArtifactsServicer(manager.store), server)
        pb_grpc.add_ModelsServicer_to_server(ModelsServicer(registry), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            agent = Agent(settings, manager, server, port, channel)
            yield agent, pb_grpc.ModelsStub(channel)
    finally:
        await server.stop(None)
        await asyncio.to_thread(registry.close)
        await manager.drain(0)
        manager.close()


async def upload(agent: Agent, filename: str) -> str:
    """Put a fixture model into the agent's store; its digest."""
    data = (MODELS / filename).read_bytes()
    await agent.put(data)
    return digest_of(data)


async def refused(call: Any, request: Any) -> grpc.aio.AioRpcError:
    """The error a call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    return caught.value


def test_deploy_route_list_undeploy_over_grpc(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(tmp_path) as (agent, models):
            fp32, int8 = await upload(agent, FP32), await upload(agent, INT8)
            first = await models.Deploy(pb.DeployRequest(name="digits", digest=fp32, filename=FP32))
            assert (first.version, first.created) == (1, True)
            again = await models.Deploy(pb.DeployRequest(name="digits", digest=fp32))
            assert (again.version, again.created) == (1, False)
            canary = await models.Deploy(
                pb.DeployRequest(name="digits", digest=int8, filename=INT8, canary_percent=20)
            )
            assert [(w.version, w.percent) for w in canary.model.route.split] == [(2, 20), (1, 80)]

            listed = await models.List(pb.ListModelsRequest())
            assert [m.name for m in listed.models] == ["digits"]
            assert [(v.version, v.state, v.filename) for v in listed.models[0].versions] == [
                (1, pb.VERSION_STATE_READY, FP32),
                (2, pb.VERSION_STATE_READY, INT8),
            ]

            error = await refused(models.Undeploy, pb.UndeployRequest(name="digits", version=1))
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error.details() == (
                "model digits version 1 is in use by the route (split 2:20% 1:80%); "
                "route traffic away from it first"
            )
            back = await models.Route(pb.RouteRequest(name="digits", rollback=True))
            assert [(w.version, w.percent) for w in back.route.split] == [(1, 100)]
            left = await models.Undeploy(pb.UndeployRequest(name="digits", version=2))
            assert [v.version for v in left.versions] == [1]

            await models.Undeploy(pb.UndeployRequest(name="digits"))
            assert not (await models.List(pb.ListModelsRequest())).models

    run(scenario(), timeout=90)


def test_bad_requests_map_to_grpc_statuses_and_the_agent_stays_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(tmp_path) as (agent, models):
            fp32 = await upload(agent, FP32)
            await models.Deploy(pb.DeployRequest(name="digits", digest=fp32))
            missing = "sha256:" + "1" * 64
            cases = [
                (
                    models.Deploy,
                    pb.DeployRequest(name="digits", digest=missing, filename="x.onnx"),
                    grpc.StatusCode.NOT_FOUND,
                    f"model file x.onnx ({missing}) is not on this agent: upload it first",
                ),
                (
                    models.Deploy,
                    pb.DeployRequest(name="Bad/Name", digest=fp32),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "invalid model name 'Bad/Name': use 1-64 of a-z 0-9 _ . - starting with a "
                    "letter or digit",
                ),
                (
                    models.Route,
                    pb.RouteRequest(
                        name="digits",
                        route=pb.Route(split=[pb.VersionWeight(version=1, percent=50)]),
                    ),
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "model digits: percentages sum to 50, not 100",
                ),
                (
                    models.Route,
                    pb.RouteRequest(name="digits", rollback=True),
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "model digits has no previous route to roll back to",
                ),
                (
                    models.List,
                    pb.ListModelsRequest(name="ghost"),
                    grpc.StatusCode.NOT_FOUND,
                    "model 'ghost' is not deployed on this agent",
                ),
            ]
            for call, request, code, details in cases:
                error = await refused(call, request)
                assert (error.code(), error.details()) == (code, details)

            junk = b"\x08\x07" + b"\xff" * 200  # looks like ONNX by its first bytes, is not
            await agent.put(junk)
            error = await refused(
                models.Deploy,
                pb.DeployRequest(name="digits", digest=digest_of(junk), filename="junk.onnx"),
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = error.details() or ""
            assert details.startswith("junk.onnx cannot be loaded by onnxruntime: ")
            assert "\n" not in details
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            assert info.name == "test-agent"
            listed = await models.List(pb.ListModelsRequest(name="digits"))
            assert [v.version for v in listed.models[0].versions] == [1]

    run(scenario(), timeout=90)


def test_health_answers_while_deploys_are_held_in_their_load_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # More deploys than asyncio's default thread pool has threads: were deploys run there, the
    # health checks queued behind them would wait for the deploys to finish.
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    release = tmp_path / "release"
    monkeypatch.setenv(FAULT_ENV, "loadcheck-sleep")
    monkeypatch.setenv(RELEASE_ENV, str(release))

    async def scenario() -> None:
        async with oip_agent(registry_settings(tmp_path)) as agent:
            data = (MODELS / FP32).read_bytes()
            await agent.artifacts.Put(put_chunks(data, 1 << 20), timeout=60)
            deploys = [
                asyncio.ensure_future(
                    agent.models.Deploy(
                        pb.DeployRequest(name=f"m{i}", digest=digest_of(data)), timeout=120
                    )
                )
                for i in range(count)
            ]
            try:
                await _held_checks(ADMIN_THREADS)
                ready = await agent.inference.ServerReady(ipb.ServerReadyRequest(), timeout=20)
                status, _, _ = await agent.http("GET", "/v2/health/ready")
                metrics, _, _ = await agent.http("GET", "/metrics")
                listed = await agent.models.List(pb.ListModelsRequest(), timeout=20)
                assert not any(d.done() for d in deploys)  # all still in flight
                assert (ready.ready, status, metrics, list(listed.models)) == (True, 200, 200, [])
            finally:
                release.touch()
            answers = await asyncio.gather(*deploys)
            assert [a.created for a in answers] == [True] * count

    run(scenario(), timeout=600)


async def _held_checks(count: int) -> None:
    """Wait until `count` load-check children of this process are running."""
    me = psutil.Process()
    for _ in range(3000):
        children = [c for c in me.children() if "mle_agent.serving.loadcheck" in _cmdline(c)]
        if len(children) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} load checks started")


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""
