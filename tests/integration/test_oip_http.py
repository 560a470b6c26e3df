"""The Open Inference Protocol REST routes and /metrics of a real in-process agent, over raw
http.client requests and sockets: JSON and binary tensors, errors, auth, limits, hostile input."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mle_agent.serving.oip_http import http_address
from mle_proto.errors import UsageError
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import agent_settings, digest_of, leak_check, put_chunks, run
from tests.integration._serving import digit_rows, reference
from tests.oip_helpers import ServingAgent, http_request, serving_agent

pytestmark = pytest.mark.timeout(120)
TOKEN = "rest-token-for-tests"
JSON_ROWS = 8


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def json_infer(rows: np.ndarray[Any, Any], **extra: Any) -> bytes:
    """An infer body with the rows as nested JSON data."""
    tensor = {"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.tolist()}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def binary_infer(rows: np.ndarray[Any, Any], **extra: Any) -> tuple[bytes, dict[str, str]]:
    """An infer body with the rows as binary tensor data, as tritonclient sends it."""
    tensor = {
        "name": "input",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "parameters": {"binary_data_size": rows.nbytes},
    }
    header = json.dumps({"inputs": [tensor], **extra}).encode()
    return header + rows.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def error_of(body: bytes) -> str:
    """The one-line message of a JSON error body."""
    message = json.loads(body)["error"]
    assert isinstance(message, str) and "\n" not in message
    return message


def raw_exchange(port: int, data: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a fresh connection; everything the server sends until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_health_server_metadata_and_unknown_routes(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            assert (await agent.http("GET", "/v2/health/live"))[0] == 200
            status, headers, body = await agent.http("GET", "/v2/health/ready")
            assert (status, body) == (200, b"")  # ready with no model: ready for deploys
            status, headers, body = await agent.http("GET", "/v2")
            assert status == 200 and headers["content-type"] == "application/json"
            assert json.loads(body)["name"] == "mle-agent"
            assert "binary_tensor_data" in json.loads(body)["extensions"]
            status, _, body = await agent.http("GET", "/v2/nothing/here")
            assert (status, error_of(body)) == (404, "no route /v2/nothing/here")
            status, _, body = await agent.http("POST", "/v2/health/live", b"{}")
            assert (status, error_of(body)) == (
                405,
                "POST is not allowed on /v2/health/live; use GET",
            )

    run(scenario())


def test_model_metadata_and_readiness(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            await agent.deploy("digits_int8.onnx")
            for path in ("/v2/models/digits", "/v2/models/digits/versions/1"):
                status, _, body = await agent.http("GET", path)
                meta = json.loads(body)
                assert status == 200
                assert (meta["name"], meta["platform"]) == ("digits", "onnxruntime_onnx")
                assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
                assert sorted(meta["versions"]) == ["1", "2"]
            for path in ("/v2/models/digits/ready", "/v2/models/digits/versions/2/ready"):
                assert (await agent.http("GET", path))[0] == 200
            status, _, body = await agent.http("GET", "/v2/models/nope")
            assert status == 404 and "nope" in error_of(body)
            status, _, body = await agent.http("GET", "/v2/models/digits/versions/7")
            assert status == 404 and "7" in error_of(body)
            status, _, body = await agent.http("GET", "/v2/models/digits/versions/one")
            assert (status, error_of(body)) == (
                400, "model version must be a positive integer, got 'one'"
            )  # fmt: skip

    run(scenario())


def test_json_infer_equals_in_process_onnxruntime(tmp_path: Path) -> None:
    rows = digit_rows()[0][:JSON_ROWS]
    expected = reference("digits_fp32.onnx", rows)

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            body = json_infer(rows, id="r-1")
            status, headers, answer = await agent.http("POST", "/v2/models/digits/infer", body)
            assert status == 200 and "inference-header-content-length" not in headers
            result = json.loads(answer)
            assert (result["model_name"], result["model_version"], result["id"]) == (
                "digits", "1", "r-1"
            )  # fmt: skip
            [out] = result["outputs"]
            assert (out["name"], out["datatype"], out["shape"]) == (
                "probabilities",
                "FP32",
                [8, 10],
            )
            got = np.array(out["data"], np.float32).reshape(out["shape"])
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    run(scenario())


def test_binary_tensor_data_both_ways(tmp_path: Path) -> None:
    rows = digit_rows()[0][:64]
    expected = reference("digits_int8.onnx", rows)

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            await agent.deploy("digits_int8.onnx")
            outputs = [{"name": "probabilities", "parameters": {"binary_data": True}}]
            for extra in ({"outputs": outputs}, {"parameters": {"binary_data_output": True}}):
                body, headers = binary_infer(rows, **extra)
                path = "/v2/models/digits/versions/2/infer"
                status, got_headers, answer = await agent.http("POST", path, body, headers)
                assert status == 200, answer[:300]
                size = int(got_headers["inference-header-content-length"])
                result = json.loads(answer[:size])
                assert result["model_version"] == "2"
                [out] = result["outputs"]
                assert out["parameters"] == {"binary_data_size": 64 * 10 * 4}
                got = np.frombuffer(answer[size:], "<f4").reshape(out["shape"])
                np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    run(scenario())


def test_bad_infer_requests_are_one_line_errors(tmp_path: Path) -> None:
    rows = digit_rows()[0][:2]
    binary, headers = binary_infer(rows)
    too_long = {"Inference-Header-Content-Length": str(len(binary) + 1)}
    huge = {"Inference-Header-Content-Length": "9" * 5000}  # int() refuses over 4300 digits
    cases: list[tuple[str, bytes, dict[str, str], int, str]] = [
        ("digits", b"{not json", {}, 400, "request body is not valid JSON: Expecting"),
        ("digits", b"[" * 100_000 + b"]" * 100_000, {}, 400, "request body is not valid JSON"),
        ("digits", b"\xff\xfe\x00", {}, 400, "request body is not valid JSON"),
        ("digits", b"[1, 2]", {}, 400, "the request body must be a JSON object"),
        ("digits", b'{"inputs": 3}', {}, 400, "'inputs' must be a non-empty list of tensors"),
        ("digits", json_infer(rows[:, :60]), {}, 400, "shape"),
        ("digits", json_infer(rows, id=5), {}, 400, "'id' must be a string"),
        ("digits", json_infer(rows, outputs=[{"name": "x"}]), {}, 400, "'x'"),
        ("digits", binary[:-4], headers, 400, "input input: binary_data_size is 512 bytes"),
        ("digits", binary, too_long, 400, "invalid Inference-Header-Content-Length"),
        ("digits", binary, huge, 400, "invalid Inference-Header-Content-Length"),
        ("digits/versions/" + "9" * 5000, json_infer(rows), {}, 400, "model version must be"),
        ("nope", json_infer(rows), {}, 404, "nope"),
    ]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            for model, body, sent, expected, fragment in cases:
                path = f"/v2/models/{model}/infer"
                status, _, answer = await agent.http("POST", path, body, sent)
                assert (status, fragment in error_of(answer)) == (expected, True), answer
            ok = await agent.http("POST", "/v2/models/digits/infer", json_infer(rows))
            assert ok[0] == 200

    run(scenario())


def test_metrics_count_requests(tmp_path: Path) -> None:
    rows = digit_rows()[0][:4]

    def requests_total(text: str) -> float:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if sample.name == "mle_model_requests_total" and labels == {
                    "model": "digits",
                    "version": "1",
                }:
                    return float(sample.value)
        return 0.0

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.deploy("digits_fp32.onnx")
            status, headers, before = await agent.http("GET", "/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            for _ in range(3):
                await agent.http("POST", "/v2/models/digits/infer", json_infer(rows))
            after = (await agent.http("GET", "/metrics"))[2]
            assert requests_total(after.decode()) == requests_total(before.decode()) + 3
            names = {f.name for f in text_string_to_metric_families(after.decode())}
            assert {"mle_model_request_duration_seconds", "mle_agent_cpu_percent"} <= names

    run(scenario())


def test_every_route_needs_the_token(tmp_path: Path) -> None:
    rows = digit_rows()[0][:2]
    routes = [
        ("GET", "/v2/health/live", b""),
        ("GET", "/v2/health/ready", b""),
        ("GET", "/v2", b""),
        ("GET", "/metrics", b""),
        ("GET", "/v2/models/digits", b""),
        ("GET", "/v2/models/digits/ready", b""),
        ("POST", "/v2/models/digits/infer", json_infer(rows)),
        ("GET", "/no/such/route", b""),
    ]

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path), token=TOKEN) as agent:
            await agent.deploy("digits_fp32.onnx")
            port = agent.http_port
            for method, path, body in routes:
                for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    status, headers, answer = await asyncio.to_thread(
                        http_request, port, method, path, body, auth
                    )
                    assert (status, error_of(answer)) == (401, "missing or wrong token")
                    assert headers["www-authenticate"] == "Bearer"
                status = (await agent.http(method, path, body))[0]
                assert status == (404 if path == "/no/such/route" else 200)

    run(scenario())


def test_bodies_over_the_limit_are_refused_before_they_are_read(tmp_path: Path) -> None:
    limit = 64 * 1024
    settings = agent_settings(tmp_path, max_message_bytes=limit)
    rows = digit_rows()[0][:300]  # 76.8 kB of binary data

    def headers_only(port: int, length: int) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.putrequest("POST", "/v2/models/digits/infer")
            connection.putheader("Content-Length", str(length))
            connection.endheaders()  # and never a byte of the body
            response = connection.getresponse()
            return response.status, error_of(response.read())
        finally:
            connection.close()

    async def scenario() -> None:
        async with serving_agent(settings) as agent:
            await agent.deploy("digits_fp32.onnx")
            status, message = await asyncio.to_thread(headers_only, agent.http_port, 10**12)
            assert (status, message) == (
                413, f"request body is {10**12} bytes; the agent's limit is {limit}"
            )  # fmt: skip
            body, headers = binary_infer(rows)
            status, _, answer = await agent.http("POST", "/v2/models/digits/infer", body, headers)
            assert status == 413 and "limit" in error_of(answer)
            small, headers = binary_infer(rows[:100])
            assert (await agent.http("POST", "/v2/models/digits/infer", small, headers))[0] == 200

    run(scenario())


def test_json_with_more_values_than_the_limit_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    limit = 256 * 1024
    settings = agent_settings(tmp_path, max_message_bytes=limit)
    values = limit // 8  # the agent's limit on JSON values per request
    over = np.zeros((600, 64), np.float32)  # 38400 values in under 200 kB of JSON
    under = np.zeros((500, 64), np.float32)  # 32000 values, and a bracket and a comma per row

    async def scenario() -> None:
        async with serving_agent(settings) as agent:
            await agent.deploy("digits_fp32.onnx")
            body = json_infer(over)
            assert len(body) < limit
            status, _, answer = await agent.http("POST", "/v2/models/digits/infer", body)
            assert (status, error_of(answer)) == (
                413,
                f"the request's JSON holds more than {values} values, the agent's limit: "
                "send large tensors as binary data (binary_data_size)",
            )
            status, _, answer = await agent.http(
                "POST", "/v2/models/digits/infer", json_infer(under)
            )
            assert status == 200
            assert json.loads(answer)["outputs"][0]["shape"] == [500, 10]
            binary, headers = binary_infer(over)  # the same tensor as binary data is fine
            status, _, _ = await agent.http("POST", "/v2/models/digits/infer", binary, headers)
            assert status == 200

    run(scenario())


def test_values_json_cannot_carry_are_null_in_a_valid_json_answer(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    data = model.SerializeToString()
    rows = np.array([[-1.0, 0.0, 1.0, np.inf]], np.float32)  # log: nan, -inf, 0, inf
    header = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                     "parameters": {"binary_data_size": rows.nbytes}}]}
    ).encode()  # fmt: skip

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            await agent.artifacts.Put(put_chunks(data, 1 << 20), timeout=60)
            request = pb.DeployRequest(name="log", digest=digest_of(data), filename="log.onnx")
            await agent.models.Deploy(request, timeout=120)
            status, _, answer = await agent.http(
                "POST",
                "/v2/models/log/infer",
                header + rows.tobytes(),
                {"Inference-Header-Content-Length": str(len(header))},
            )
            assert status == 200
            [out] = json.loads(answer, parse_constant=strict)["outputs"]
            assert out["data"] == [None, None, 0.0, None]

    run(scenario())


def test_malformed_and_hostile_http_gets_a_clean_refusal(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path), http_timeout=0.5) as agent:
            port = agent.http_port

            async def exchange(data: bytes) -> bytes:
                return await asyncio.to_thread(raw_exchange, port, data)

            assert (await exchange(b"GARBAGE\r\n\r\n")).startswith(b"HTTP/1.1 400 ")
            answer = await exchange(b"GET /v2 HTTP/2.0\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 505 ")
            answer = await exchange(b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 400 ")
            huge = b"GET /v2 HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
            assert (await exchange(huge)).startswith(b"HTTP/1.1 431 ")
            chunked = b"POST /v2/models/d/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            assert (await exchange(chunked)).startswith(b"HTTP/1.1 411 ")
            bad_length = b"POST /v2/models/d/infer HTTP/1.1\r\nContent-Length: -5\r\n\r\n"
            assert (await exchange(bad_length)).startswith(b"HTTP/1.1 400 ")
            huge_length = b"POST /v2/models/d/infer HTTP/1.1\r\nContent-Length: " + b"9" * 5000
            answer = await exchange(huge_length + b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 413 ") and b"is 99999999999999999999" in answer
            # A client that stalls mid-head or mid-body is disconnected after the timeout.
            assert await exchange(b"GET /v2 HTTP/1.1\r\nHost: x") == b""
            stalled = b"POST /v2/models/d/infer HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"
            assert await exchange(stalled) == b""
            assert (await agent.http("GET", "/v2/health/live"))[0] == 200

    run(scenario())


def test_keep_alive_and_pipelined_requests(tmp_path: Path) -> None:
    two = b"GET /v2/health/live HTTP/1.1\r\n\r\nGET /v2 HTTP/1.1\r\nConnection: close\r\n\r\n"

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            answer = await asyncio.to_thread(raw_exchange, agent.http_port, two)
            assert answer.count(b"HTTP/1.1 200 OK") == 2
            assert b'"name": "mle-agent"' in answer

    run(scenario())


def test_http_address_follows_the_settings(tmp_path: Path) -> None:
    base = agent_settings(tmp_path, listen="127.0.0.1:7443")
    assert http_address(base) == ("127.0.0.1", 7444)
    assert http_address(replace(base, listen="127.0.0.1:0")) == ("127.0.0.1", 0)
    assert http_address(replace(base, http_listen="off")) is None
    assert http_address(replace(base, http_listen="[::1]:8000")) == ("::1", 8000)
    with pytest.raises(
        UsageError, match="invalid http_listen 'nowhere': expected HOST:PORT or off"
    ):
        http_address(replace(base, http_listen="nowhere"))


def test_http_listen_off_and_public_addresses(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path, http_listen="off")) as agent:
            assert agent.http_port == 0
        public = agent_settings(tmp_path, http_listen="0.0.0.0:0")
        with pytest.raises(UsageError, match=r"refusing to listen on 0\.0\.0\.0:0 without TLS"):
            async with serving_agent(public):
                pass

    run(scenario())


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
def test_tls_requires_a_client_certificate(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    _make_pki(pki)
    settings = replace(
        agent_settings(tmp_path),
        tls_cert=pki / "server.crt",
        tls_key=pki / "server.key",
        tls_ca=pki / "ca.crt",
    )

    def get(port: int, with_cert: bool) -> int:
        context = ssl.create_default_context(cafile=pki / "ca.crt")
        if with_cert:
            context.load_cert_chain(pki / "client.crt", pki / "client.key")
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        try:
            connection.request("GET", "/v2/health/live")
            return connection.getresponse().status
        finally:
            connection.close()

    async def scenario(agent: ServingAgent) -> None:
        assert await asyncio.to_thread(get, agent.http_port, True) == 200
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(get, agent.http_port, False)

    async def main() -> None:
        async with serving_agent(settings) as agent:
            await scenario(agent)

    run(main())


def test_closing_lets_requests_in_progress_finish_and_drops_idle_connections(
    tmp_path: Path,
) -> None:
    rows = digit_rows()[0][:16]

    def idle_connection(port: int) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/v2/health/live")
        assert connection.getresponse().read() == b""  # kept alive, then left idle
        return connection

    async def scenario() -> None:
        async with serving_agent(agent_settings(tmp_path)) as agent:
            assert agent.httpd is not None
            await agent.deploy("slow.onnx", name="slow")
            idle = await asyncio.to_thread(idle_connection, agent.http_port)
            slow = asyncio.create_task(
                agent.http("POST", "/v2/models/slow/infer", json_infer(rows))
            )
            while not agent.httpd.in_progress:
                await asyncio.sleep(0.005)
            await agent.httpd.close(grace=60)
            status, _, body = await slow
            assert status == 200 and json.loads(body)["model_name"] == "slow"
            assert idle.sock is not None and await asyncio.to_thread(idle.sock.recv, 1) == b""
            idle.close()

    run(scenario())
