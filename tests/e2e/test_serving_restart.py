"""A restarted `mle-agentd` listens at once, restores its models in the background (each file
checked again first), serves the same routes, and stays up when a stored model no longer loads."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from mle_agent.serving.loadcheck import FAULT_ENV, RELEASE_ENV
from mle_proto.v1 import agent_pb2 as pb
from mle_proto.v1 import agent_pb2_grpc as pb_grpc
from mle_proto.v1 import inference_pb2 as ipb
from mle_proto.v1 import inference_pb2_grpc as ipb_grpc
from tests.agent_helpers import Daemon, daemon, digest_of, leak_check, put_chunks, subprocess_env
from tests.integration._serving import FP32, INT8, MODELS, digit_rows

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


class Agent:
    """Blocking Models and OIP clients for a daemon's address."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.models = pb_grpc.ModelsStub(self.channel)
        self.inference = ipb_grpc.GRPCInferenceServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def deploy(self, filename: str, name: str, **fields: Any) -> pb.DeployResponse:
        data = (MODELS / filename).read_bytes()
        pb_grpc.ArtifactsStub(self.channel).Put(put_chunks(data, 1 << 20), timeout=60)
        request = pb.DeployRequest(name=name, digest=digest_of(data), filename=filename, **fields)
        response: pb.DeployResponse = self.models.Deploy(request, timeout=180)
        return response

    def status(self, name: str) -> pb.ModelStatus:
        (model,) = self.models.List(pb.ListModelsRequest(name=name), timeout=30).models
        return model

    def ready(self) -> bool:
        return bool(self.inference.ServerReady(ipb.ServerReadyRequest(), timeout=30).ready)

    def infer(self, name: str, request_id: str = "") -> str:
        """One row through ModelInfer; the version that answered."""
        rows = digit_rows()[0][:1]
        request = ipb.ModelInferRequest(model_name=name, id=request_id)
        request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
        request.raw_input_contents.append(rows.tobytes())
        response = self.inference.ModelInfer(request, timeout=60)
        probabilities = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(1, 10)
        assert abs(float(probabilities.sum()) - 1.0) < 1e-3
        return str(response.model_version)

    def settled(self, name: str, timeout: float = 120.0) -> pb.ModelStatus:
        """The model's status once no version is LOADING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(name)
            if all(v.state != pb.VERSION_STATE_LOADING for v in status.versions):
                return status
            time.sleep(0.05)
        raise AssertionError(f"model {name} still loading after {timeout}s")


def agent_of(state: dict[str, Any]) -> Agent:
    return Agent(state["address"])


class HeldDaemon(Daemon):
    """A daemon whose load checks wait until `release` exists (MLE_AGENT_FAULT=loadcheck-sleep)."""

    def __init__(self, tmp_path: Path, release: Path, *args: str) -> None:
        super().__init__(tmp_path, *args)
        self.release = release

    def start(self) -> HeldDaemon:
        env = subprocess_env(**{FAULT_ENV: "loadcheck-sleep", RELEASE_ENV: str(self.release)})
        with self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                self.argv, env=env, stdout=subprocess.DEVNULL, stderr=err
            )
        return self


def test_a_restarted_agent_listens_first_then_serves_the_same_route(tmp_path: Path) -> None:
    with daemon(tmp_path, "--listen", "127.0.0.1:0") as first:
        agent = agent_of(first.wait_ready())
        try:
            agent.deploy(FP32, "digits")
            agent.deploy(INT8, "digits", canary_percent=30)
            before = agent.status("digits").route
            answers = {f"id-{i}": agent.infer("digits", f"id-{i}") for i in range(40)}
            assert set(answers.values()) == {"1", "2"}
        finally:
            agent.close()

    release = tmp_path / "release"
    second = HeldDaemon(tmp_path, release, "--listen", "127.0.0.1:0").start()
    try:
        agent = agent_of(second.wait_ready())  # listening while the restore is held
        try:
            status = agent.status("digits")
            assert status.route == before
            assert {v.state for v in status.versions} == {pb.VERSION_STATE_LOADING}
            assert not agent.ready()
            release.touch()
            status = agent.settled("digits")
            assert {v.state for v in status.versions} == {pb.VERSION_STATE_READY}
            assert agent.ready()
            assert {i: agent.infer("digits", i) for i in answers} == answers
        finally:
            agent.close()
    finally:
        release.touch()
        second.stop()


def test_a_stored_model_that_no_longer_loads_fails_alone_and_the_agent_stays_up(
    tmp_path: Path,
) -> None:
    with daemon(tmp_path, "--listen", "127.0.0.1:0") as first:
        agent = agent_of(first.wait_ready())
        try:
            agent.deploy(FP32, "digits")
            agent.deploy(INT8, "other")
        finally:
            agent.close()
    stored = tmp_path / "data" / "models" / "digits" / "1" / "model.onnx"
    stored.unlink()  # a hard link to the artifact store: replace it, do not write through it
    stored.write_bytes((MODELS / FP32).read_bytes()[:2000])

    with daemon(tmp_path, "--listen", "127.0.0.1:0") as second:
        agent = agent_of(second.wait_ready())
        try:
            v1 = agent.settled("digits").versions[0]
            assert v1.state == pb.VERSION_STATE_FAILED
            assert v1.message.startswith(f"{FP32} is corrupt: sha256 "), v1.message
            assert "\n" not in v1.message
            assert agent.settled("other").versions[0].state == pb.VERSION_STATE_READY
            assert agent.infer("other") == "1"
            with pytest.raises(grpc.RpcError) as refused:
                agent.infer("digits")
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert refused.value.details() == f"model digits version 1 failed to load: {v1.message}"
            assert not agent.ready()  # a routed version is not loaded
        finally:
            agent.close()
        assert second.process is not None and second.process.poll() is None
