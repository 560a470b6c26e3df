"""Helpers for the serving tests: a registry on a temp data dir, fixture models, references."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from mle_agent.serving.registry import InferRequest, InferResult, ModelRegistry
from mle_agent.settings import AgentSettings
from mle_proto.store import ArtifactStore
from mle_proto.v1 import agent_pb2 as pb
from tests.agent_helpers import REPO, agent_settings

MODELS = REPO / "tests" / "fixtures" / "models"
FP32, INT8, H64, SLOW = "digits_fp32.onnx", "digits_int8.onnx", "digits_h64_fp32.onnx", "slow.onnx"


def digit_rows() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The held-out digits: X float32 [n,64], y int64 [n]."""
    with np.load(MODELS / "digits_test.npz") as data:
        return data["X"], data["y"]


@contextlib.contextmanager
def open_registry(settings: AgentSettings) -> Iterator[ModelRegistry]:
    """A started registry, closed afterwards even when the test fails."""
    registry = ModelRegistry(settings, ArtifactStore(settings.artifacts_root))
    try:
        registry.start()
        yield registry
    finally:
        registry.close()


def registry_settings(tmp_path: Path, **overrides: Any) -> AgentSettings:
    """Agent settings for a registry test: short waits."""
    return agent_settings(tmp_path, **{"load_wait": 10.0, **overrides})


def deploy(
    registry: ModelRegistry, filename: str, name: str = "digits", **fields: Any
) -> pb.DeployResponse:
    """Put a fixture model in the store and deploy it."""
    digest, _ = registry.store.put_file(MODELS / filename)
    request = pb.DeployRequest(name=name, digest=digest, filename=filename, **fields)
    return registry.deploy(request)


def infer(
    registry: ModelRegistry, rows: npt.NDArray[np.float32], name: str = "digits", **fields: Any
) -> InferResult:
    """One inference on `rows` (FP32 [n,64])."""
    return registry.infer(InferRequest(name, {"input": rows}, **fields))


def route(registry: ModelRegistry, name: str = "digits", **fields: Any) -> pb.ModelStatus:
    """Apply a route built from pb.Route fields."""
    return registry.route(pb.RouteRequest(name=name, route=pb.Route(**fields)))


def split(*pairs: tuple[int, float]) -> list[pb.VersionWeight]:
    """A split as VersionWeights."""
    return [pb.VersionWeight(version=v, percent=p) for v, p in pairs]


def rollback(registry: ModelRegistry, name: str = "digits") -> pb.ModelStatus:
    """Roll the model's route back."""
    return registry.route(pb.RouteRequest(name=name, rollback=True))


def version_of(status: pb.ModelStatus, version: int) -> pb.VersionStatus:
    """One version's status."""
    return next(v for v in status.versions if v.version == version)


def model_status(registry: ModelRegistry, name: str = "digits") -> pb.ModelStatus:
    """The model's status."""
    return registry.status(name)[0]


def reference(filename: str, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The model's probabilities computed in-process with onnxruntime, one call."""
    session = ort.InferenceSession(str(MODELS / filename), providers=["CPUExecutionProvider"])
    result: npt.NDArray[np.float32] = session.run(["probabilities"], {"input": rows})[0]
    return result


def other_signature_model(path: Path, rows: str | int = "n", width: int = 32) -> Path:
    """A tiny valid ONNX model taking FP32 [rows,width] (the fixtures take [n,64])."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.ones((width, 10), np.float32), name="w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["probabilities"])],
        "other",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [rows, 10])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path
