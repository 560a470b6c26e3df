"""Interop: tritonclient (gRPC and HTTP), a client nobody here wrote, against a real `mle-agentd`.

tritonclient pins protobuf < 7, so it runs from the peers venv (scripts/peers.sh) as a subprocess:
tests/peers/triton_client.py prints what it saw as JSON, and this test compares the outputs with
the same models run in-process (onnxruntime, LiteRT).
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from tests.agent_helpers import REPO, daemon, digest_of, leak_check, put_chunks
from tests.integration._serving import digit_rows, reference
from tests.oip_helpers import MODELS

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]
TOKEN = "interop-token-0123456789"
PEERS = Path(os.environ.get("MLE_PEERS_DIR", REPO / ".peers"))
PEERS_PYTHON = PEERS / "bin" / "python"
CLIENT = REPO / "tests" / "peers" / "triton_client.py"
BATCH = 16  # rows per request to the ONNX models


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


@pytest.fixture
def peers_python() -> Path:
    """The peers venv's python with tritonclient, or a skip saying how to get it."""
    if not PEERS_PYTHON.exists():
        pytest.skip(f"no peers venv at {PEERS} (run scripts/peers.sh, or set MLE_PEERS_DIR)")
    probe = subprocess.run(
        [str(PEERS_PYTHON), "-c", "import tritonclient.grpc, tritonclient.http"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"tritonclient is not installed in {PEERS} (run scripts/peers.sh)")
    return PEERS_PYTHON


def litert_reference(filename: str, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The TFLite model's outputs in-process with LiteRT, one row per call (fixed batch 1)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(MODELS / filename))
    interpreter.allocate_tensors()
    [tensor_in] = interpreter.get_input_details()
    [tensor_out] = interpreter.get_output_details()
    answers = []
    for row in rows:
        interpreter.set_tensor(tensor_in["index"], row[np.newaxis])
        interpreter.invoke()
        answers.append(interpreter.get_tensor(tensor_out["index"])[0].copy())
    return np.stack(answers)


def batched_reference(filename: str, rows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """onnxruntime in-process on the same batches the client sends: the int8 model quantizes
    its activations per call (dynamic quantization), so answers depend on the batch."""
    batches = [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]
    return np.concatenate([reference(filename, batch) for batch in batches])


def deploy(address: str, filename: str, name: str) -> int:
    """Upload a fixture through Artifacts.Put and deploy it through Models.Deploy; its version."""
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    data = (MODELS / filename).read_bytes()
    with grpc.insecure_channel(address) as channel:
        pb_grpc.ArtifactsStub(channel).Put(put_chunks(data, 1 << 20), metadata=metadata, timeout=60)
        request = pb.DeployRequest(name=name, digest=digest_of(data), filename=filename)
        models = pb_grpc.ModelsStub(channel)
        response = models.Deploy(request, metadata=metadata, timeout=180)
    return int(response.version)


def triton(python: Path, state: dict[str, Any], model: str, rows: Path, *args: str) -> Any:
    """Run the tritonclient script against the agent; what it printed."""
    argv = [
        str(python), str(CLIENT),
        "--grpc", state["address"],
        "--http", f"127.0.0.1:{state['http_port']}",
        "--model", model, "--rows", str(rows), "--token", TOKEN, *args,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def check_session(seen: dict[str, Any], name: str, version: str, platform: str) -> None:
    """Health and metadata as one client saw them."""
    assert (seen["live"], seen["ready"], seen["model_ready"]) == (True, True, True)
    assert seen["server"]["name"] == "mle-agent"
    meta = seen["metadata"]
    assert (meta["name"], meta["platform"], version in meta["versions"]) == (name, platform, True)
    assert [t["name"] for t in meta["inputs"]] == ["input"]
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert [t["name"] for t in meta["outputs"]] == ["probabilities"]


def test_tritonclient_grpc_and_http_get_the_in_process_answers(
    tmp_path: Path, peers_python: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    x, _ = digit_rows()
    onnx_rows, lite_rows = x[:40], x[:6]
    np.save(tmp_path / "onnx_rows.npy", onnx_rows)
    np.save(tmp_path / "lite_rows.npy", lite_rows)
    with daemon(tmp_path, "--listen", "127.0.0.1:0", "--token-file", str(token_file)) as agentd:
        state = agentd.wait_ready()
        assert state["http_port"] > 0
        assert deploy(state["address"], "digits_fp32.onnx", "digits") == 1
        assert deploy(state["address"], "digits_int8.onnx", "digits") == 2
        assert deploy(state["address"], "digits_fp32.tflite", "digits-lite") == 1

        latest = triton(peers_python, state, "digits", tmp_path / "onnx_rows.npy")
        pinned = triton(peers_python, state, "digits", tmp_path / "onnx_rows.npy", "--version", "1")
        lite = triton(
            peers_python, state, "digits-lite", tmp_path / "lite_rows.npy", "--batch", "1"
        )

    expected = {
        "latest": (
            latest,
            "2",
            batched_reference("digits_int8.onnx", onnx_rows),
            "onnxruntime_onnx",
        ),
        "pinned": (
            pinned,
            "1",
            batched_reference("digits_fp32.onnx", onnx_rows),
            "onnxruntime_onnx",
        ),
        "lite": (lite, "1", litert_reference("digits_fp32.tflite", lite_rows), "tensorflow_lite"),
    }
    for case, (report, version, answers, platform) in expected.items():
        for protocol in ("grpc", "http"):
            seen = report[protocol]
            name = "digits-lite" if case == "lite" else "digits"
            check_session(seen, name, version, platform)
            assert set(seen["versions"]) == {version}, (case, protocol, seen["versions"])
            got = np.array(seen["outputs"], np.float32)
            np.testing.assert_allclose(got, answers, rtol=1e-5, atol=1e-6, err_msg=case)


@pytest.mark.parametrize("http_listen", ["", "off", "127.0.0.1:0"])
def test_the_daemon_reports_its_rest_port(tmp_path: Path, http_listen: str) -> None:
    args = ["--listen", "127.0.0.1:0", *(["--http-listen", http_listen] if http_listen else [])]
    with daemon(tmp_path, *args) as agentd:
        state = agentd.wait_ready()
        with grpc.insecure_channel(state["address"]) as channel:
            info = pb_grpc.AgentStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
        assert info.http_port == state["http_port"]
        if http_listen == "off":
            assert state["http_port"] == 0
        else:
            assert state["http_port"] > 0
            url = f"http://127.0.0.1:{state['http_port']}/v2/health/live"
            with urllib.request.urlopen(url, timeout=30) as answer:
                assert answer.status == 200
