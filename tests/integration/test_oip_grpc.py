"""The Open Inference Protocol gRPC service of a real in-process agent, through our own stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mle_agent.serving.registry import InferRequest
from mle_proto import __version__
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import inference_pb2 as ipb
from tests.agent_helpers import agent_settings, leak_check, run
from tests.integration._serving import digit_rows, reference
from tests.oip_helpers import ServingAgent, serving_agent

pytestmark = pytest.mark.timeout(120)
TOKEN = "oip-token-for-tests"


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def infer_request(
    rows: np.ndarray[Any, Any], model: str = "digits", version: str = "", **fields: Any
) -> ipb.ModelInferRequest:
    """A ModelInferRequest with raw FP32 [n,64] rows as `input`."""
    request = ipb.ModelInferRequest(model_name=model, model_version=version, **fields)
    request.inputs.add(name="input", datatype=rows_datatype(rows), shape=rows.shape)
    request.raw_input_contents.append(rows.tobytes())
    return request


def rows_datatype(rows: np.ndarray[Any, Any]) -> str:
    return {"float32": "FP32", "float64": "FP64", "int64": "INT64"}[rows.dtype.name]


def output(response: ipb.ModelInferResponse, index: int = 0) -> np.ndarray[Any, Any]:
    """An output as tritonclient reads it: raw bytes by index, reshaped."""
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32"
    flat = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
    return flat.reshape(tuple(tensor.shape))


async def code_of(call: Any, request: Any, agent: ServingAgent) -> tuple[grpc.StatusCode, str]:
    """The status code and message a call fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, metadata=agent.metadata, timeout=30)
    return info.value.code(), info.value.details() or ""


def test_health_and_metadata_with_no_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            oip = agent.inference
            assert (await oip.ServerLive(ipb.ServerLiveRequest())).live
            assert (await oip.ServerReady(ipb.ServerReadyRequest())).ready  # ready for deploys
            meta = await oip.ServerMetadata(ipb.ServerMetadataRequest())
            assert (meta.name, meta.version) == ("mle-agent", __version__)
            assert "binary_tensor_data" in meta.extensions
            health = health_pb2_grpc.HealthStub(agent.channel)
            for service in ("inference.GRPCInferenceService", "mle.v1.Models"):
                check = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert check.status == health_pb2.HealthCheckResponse.SERVING
            info = await agent.agent.GetInfo(pb.GetInfoRequest())
            assert info.http_port == agent.http_port > 0

    run(scenario())


def test_infer_equals_in_process_onnxruntime_and_names_the_version(tmp_path: Path) -> None:
    rows, _ = digit_rows()

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            assert (await agent.deploy("digits_fp32.onnx")).version == 1
            oip = agent.inference
            meta = await oip.ModelMetadata(ipb.ModelMetadataRequest(name="digits"))
            assert (meta.name, list(meta.versions), meta.platform) == (
                "digits", ["1"], "onnxruntime_onnx"
            )  # fmt: skip
            tensors = [(t.name, t.datatype, list(t.shape)) for t in (*meta.inputs, *meta.outputs)]
            assert tensors == [("input", "FP32", [-1, 64]), ("probabilities", "FP32", [-1, 10])]
            ready = await oip.ModelReady(ipb.ModelReadyRequest(name="digits", version="1"))
            assert ready.ready

            response = await oip.ModelInfer(infer_request(rows, id="req-7"))
            assert (response.model_name, response.model_version, response.id) == (
                "digits", "1", "req-7"
            )  # fmt: skip
            assert [o.name for o in response.outputs] == ["probabilities"]
            np.testing.assert_allclose(
                output(response), reference("digits_fp32.onnx", rows), rtol=1e-5, atol=1e-6
            )

    run(scenario())


def test_typed_contents_give_the_same_answer_as_raw_bytes(tmp_path: Path) -> None:
    rows, _ = digit_rows()
    rows = rows[:16]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            typed = ipb.ModelInferRequest(model_name="digits")
            tensor = typed.inputs.add(name="input", datatype="FP32", shape=rows.shape)
            tensor.contents.fp32_contents.extend(rows.reshape(-1).tolist())
            by_contents = await agent.inference.ModelInfer(typed)
            by_raw = await agent.inference.ModelInfer(infer_request(rows))
            np.testing.assert_array_equal(output(by_contents), output(by_raw))

    run(scenario())


def test_the_route_picks_the_version_unless_the_request_names_one(tmp_path: Path) -> None:
    rows, _ = digit_rows()
    rows = rows[:32]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            assert (await agent.deploy("digits_int8.onnx")).version == 2
            latest = await agent.inference.ModelInfer(infer_request(rows))
            assert latest.model_version == "2"
            np.testing.assert_allclose(
                output(latest), reference("digits_int8.onnx", rows), rtol=1e-5, atol=1e-6
            )
            pinned = await agent.inference.ModelInfer(infer_request(rows, version="1"))
            assert pinned.model_version == "1"
            np.testing.assert_allclose(
                output(pinned), reference("digits_fp32.onnx", rows), rtol=1e-5, atol=1e-6
            )
            meta = await agent.inference.ModelMetadata(ipb.ModelMetadataRequest(name="digits"))
            assert sorted(meta.versions) == ["1", "2"]

    run(scenario())


def test_policy_parameters_come_back_as_string_parameters(tmp_path: Path) -> None:
    rows, _ = digit_rows()
    rows = rows[:8]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            for filename in ("digits_fp32.onnx", "digits_int8.onnx", "digits_h64_fp32.onnx"):
                await agent.deploy(filename)
            consensus = pb.Route(policy=pb.ROUTE_POLICY_CONSENSUS, members=[1, 2, 3])
            await agent.models.Route(pb.RouteRequest(name="digits", route=consensus))
            response = await agent.inference.ModelInfer(infer_request(rows, id="c-1"))
            direct = agent.registry.infer(InferRequest("digits", {"input": rows}, None, "c-1"))
            assert direct.parameters  # a consensus answer says who voted
            got = {k: p.string_param for k, p in response.parameters.items()}
            assert got == dict(direct.parameters)
            assert response.model_version == str(direct.version)

    run(scenario())


def test_bad_requests_get_the_right_status_and_the_agent_stays_up(tmp_path: Path) -> None:
    rows, _ = digit_rows()
    rows = rows[:4]
    short = infer_request(rows)
    short.raw_input_contents[0] = rows.tobytes()[:-4]
    unknown_output = infer_request(rows)
    unknown_output.outputs.add(name="logits")
    cases = [
        (infer_request(rows, model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (infer_request(rows, version="9"), grpc.StatusCode.NOT_FOUND, "9"),
        (infer_request(rows, version="x1"), grpc.StatusCode.INVALID_ARGUMENT, "model version"),
        (infer_request(rows, version="9" * 5000), grpc.StatusCode.INVALID_ARGUMENT, "version"),
        (infer_request(rows, model=""), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
        (infer_request(rows.astype(np.float64)), grpc.StatusCode.INVALID_ARGUMENT, "FP64"),
        (infer_request(rows[:, :63].copy()), grpc.StatusCode.INVALID_ARGUMENT, "input"),
        (short, grpc.StatusCode.INVALID_ARGUMENT, "input input: FP32 [4, 64] is 1024 bytes"),
        (unknown_output, grpc.StatusCode.INVALID_ARGUMENT, "logits"),
    ]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            oip = agent.inference
            for request, code, fragment in cases:
                got, message = await code_of(oip.ModelInfer, request, agent)
                assert (got, fragment in message) == (code, True), (got, message)
                assert "\n" not in message
            missing = ipb.ModelMetadataRequest(name="nope")
            assert (await code_of(oip.ModelMetadata, missing, agent))[
                0
            ] == grpc.StatusCode.NOT_FOUND
            huge = "9" * 5000  # int() refuses over 4300 digits: must not become INTERNAL
            for call, request in (
                (oip.ModelMetadata, ipb.ModelMetadataRequest(name="digits", version=huge)),
                (oip.ModelReady, ipb.ModelReadyRequest(name="digits", version=huge)),
            ):
                assert await code_of(call, request, agent) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"model version must be a positive integer, got {huge[:40]!r}",
                )
            assert (await oip.ModelInfer(infer_request(rows))).model_version == "1"
            assert (await oip.ServerLive(ipb.ServerLiveRequest())).live

    run(scenario())


def test_an_oversized_request_is_refused_and_the_agent_stays_up(tmp_path: Path) -> None:
    big = np.zeros((300, 64), np.float32)  # 76.8 kB, over the 64 KiB limit
    settings = agent_settings(tmp_path, max_message_bytes=64 * 1024)

    async def scenario() -> None:
        async with serving_agent(settings) as agent:
            await agent.deploy("digits_fp32.onnx")
            code, _ = await code_of(agent.inference.ModelInfer, infer_request(big), agent)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            response = await agent.inference.ModelInfer(infer_request(big[:100]))
            assert output(response).shape == (100, 10)

    run(scenario())


def test_every_inference_call_needs_the_token(tmp_path: Path) -> None:
    rows, _ = digit_rows()
    rows = rows[:2]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            await agent.deploy("digits_fp32.onnx")
            oip = agent.inference
            calls = [
                (oip.ServerLive, ipb.ServerLiveRequest()),
                (oip.ServerReady, ipb.ServerReadyRequest()),
                (oip.ServerMetadata, ipb.ServerMetadataRequest()),
                (oip.ModelReady, ipb.ModelReadyRequest(name="digits")),
                (oip.ModelMetadata, ipb.ModelMetadataRequest(name="digits")),
                (oip.ModelInfer, infer_request(rows)),
                (agent.models.List, pb.ListModelsRequest()),
            ]
            wrong = (("authorization", "Bearer not-the-token"),)
            for call, request in calls:
                for metadata in ((), wrong):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(request, metadata=metadata, timeout=30)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await call(request, metadata=agent.metadata, timeout=30)

    run(scenario())
