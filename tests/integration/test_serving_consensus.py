"""Consensus over classifiers whose first output is class labels (integer [N]) or class scores
([N, C]); a consensus route over anything else is refused before it can serve."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx = pytest.importorskip("onnx", reason="the tests build small models with onnx")

from mle_agent.serving.registry import ModelRegistry  # noqa: E402
from mle_proto.errors import InvalidInput  # noqa: E402
from mle_proto.v1 import agent_pb2 as pb  # noqa: E402
from tests.agent_helpers import leak_check  # noqa: E402
from tests.integration._serving import (  # noqa: E402
    digit_rows,
    infer,
    model_status,
    route,
)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def label_model(path: Path, weights: Any) -> Path:
    """FP32 [N,64] -> "label" INT64 [N] (ArgMax of the scores), then "scores" FP32 [N,10]."""
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["scores"]),
            helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
        ],
        "labels",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", 10]),
        ],
        [numpy_helper.from_array(weights, name="w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def score_model(path: Path) -> Path:
    """FP32 [N,64] -> "best" FP32 [N] (the largest value of each row): nothing to vote on."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMax", ["input"], ["best"], axes=[1], keepdims=0)],
        "best",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("best", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def deploy_file(registry: ModelRegistry, path: Path, name: str) -> pb.DeployResponse:
    digest, _ = registry.store.put_file(path)
    return registry.deploy(pb.DeployRequest(name=name, digest=digest, filename=path.name))


def test_consensus_votes_by_value_on_integer_labels_and_keeps_every_row(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    x, _ = digit_rows()
    rows = x[:30]
    generator = np.random.default_rng(6)
    weights = [generator.normal(size=(64, 10)).astype(np.float32) for _ in range(3)]
    for index, w in enumerate(weights):
        deploy_file(registry, label_model(tmp_path / f"labels{index}.onnx", w), "labels")
    route(registry, name="labels", policy=pb.ROUTE_POLICY_CONSENSUS, members=[1, 2, 3])

    result = infer(registry, rows, name="labels")

    scores = [rows @ w for w in weights]
    votes = np.stack([s.argmax(axis=1) for s in scores])  # member x row
    expected_labels, expected_scores = [], []
    for row in range(len(rows)):
        tally = Counter(votes[:, row].tolist())
        best = max(tally.values())
        winner = next(v for v in votes[:, row].tolist() if tally[v] == best)
        first = votes[:, row].tolist().index(winner)
        expected_labels.append(winner)
        expected_scores.append(scores[first][row])
    assert result.outputs["label"].shape == (30,)
    assert result.outputs["label"].tolist() == expected_labels
    np.testing.assert_allclose(result.outputs["scores"], np.stack(expected_scores), rtol=1e-5)
    assert (votes != votes[0]).any()  # the members disagree somewhere: a real vote
    assert result.parameters == {"mle_consensus": "1,2,3"}


def test_a_consensus_route_over_an_output_that_is_no_class_is_refused(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    deploy_file(registry, score_model(tmp_path / "best.onnx"), "best")
    other = tmp_path / "best2.onnx"
    score_model(other)
    model = onnx.load(other)
    model.doc_string = "another version"  # same signature, another file
    onnx.save(model, other)
    assert deploy_file(registry, other, "best").version == 2
    with pytest.raises(InvalidInput) as refused:
        route(registry, name="best", policy=pb.ROUTE_POLICY_CONSENSUS, members=[1, 2])
    assert refused.value.message == (
        "model best: consensus votes on the first output, which must be class labels "
        "(integer [N]) or class scores ([N, C]); version 1's 'best' is FP32 [-1]"
    )
    assert [w.version for w in model_status(registry, "best").route.split] == [2]
