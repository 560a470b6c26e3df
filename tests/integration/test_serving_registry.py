"""The serving core on real models: deploy, versions, routes, policies, bad input, restart."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

np = pytest.importorskip("numpy", reason="the serving tests need numpy (the onnx extra)")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

from mle_agent.serving.registry import InferRequest, ModelRegistry  # noqa: E402
from mle_agent.serving.stats import CountersSnapshot  # noqa: E402
from mle_proto.errors import (  # noqa: E402
    AlreadyExists,
    FailedPrecondition,
    InvalidInput,
    NotFound,
)
from mle_proto.v1 import agent_pb2 as pb  # noqa: E402
from tests.agent_helpers import leak_check  # noqa: E402
from tests.integration._serving import (  # noqa: E402
    FP32,
    H64,
    INT8,
    MODELS,
    SLOW,
    deploy,
    digit_rows,
    infer,
    model_status,
    open_registry,
    other_signature_model,
    reference,
    registry_settings,
    rollback,
    route,
    split,
    version_of,
)


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    yield from leak_check()


def test_deploy_then_infer_names_the_version_and_matches_the_runtime(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    deployed = deploy(registry, FP32, source_run="r1", source_step="train")
    assert (deployed.version, deployed.created) == (1, True)
    assert deployed.load_seconds > 0
    v1 = version_of(deployed.model, 1)
    assert v1.state == pb.VERSION_STATE_READY
    assert (v1.runtime, v1.filename, v1.source_run, v1.source_step) == (
        "onnxruntime",
        FP32,
        "r1",
        "train",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in v1.inputs] == [("input", "FP32", [-1, 64])]

    result = infer(registry, x[:20])
    assert (result.model, result.version) == ("digits", 1)
    np.testing.assert_allclose(result.outputs["probabilities"], reference(FP32, x[:20]), rtol=1e-6)
    assert version_of(model_status(registry), 1).stats.requests == 1

    version_dir = registry.settings.models_root / "digits" / "1"
    manifest = json.loads((version_dir / "manifest.json").read_text())
    assert manifest["digest"] == v1.digest
    assert (version_dir / "model.onnx").read_bytes() == (MODELS / FP32).read_bytes()
    stored = json.loads((registry.settings.models_root / "digits" / "route.json").read_text())
    assert stored["route"]["split"] == [{"version": 1, "percent": 100.0}]


def test_a_second_deploy_takes_all_traffic_and_a_redeploy_is_idempotent(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    second = deploy(registry, INT8)
    assert (second.version, second.created) == (2, True)
    assert infer(registry, x[:3]).version == 2
    again = deploy(registry, INT8)
    assert (again.version, again.created) == (2, False)
    assert [(w.version, w.percent) for w in again.model.route.split] == [(2, 100.0)]
    with pytest.raises(AlreadyExists, match="version 2 already exists with another file"):
        deploy(registry, H64, version=2)
    # The previous primary stays loaded for a fast rollback.
    states = {v.version: v.state for v in model_status(registry).versions}
    assert states == {1: pb.VERSION_STATE_READY, 2: pb.VERSION_STATE_READY}


def test_canary_splits_traffic_sticky_by_request_id_then_rolls_back(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    canary = deploy(registry, INT8, canary_percent=10)
    assert [(w.version, w.percent) for w in canary.model.route.split] == [(2, 10.0), (1, 90.0)]
    served = {f"id-{i}": infer(registry, x[:1], request_id=f"id-{i}").version for i in range(2000)}
    share = Counter(served.values())[2] / len(served)
    assert 0.07 <= share <= 0.13, share
    for request_id in list(served)[:200]:
        assert infer(registry, x[:1], request_id=request_id).version == served[request_id]

    back = rollback(registry)
    assert [(w.version, w.percent) for w in back.route.split] == [(1, 100.0)]
    assert {infer(registry, x[:1], request_id=i).version for i in list(served)[:100]} == {1}
    assert version_of(back, 2).state == pb.VERSION_STATE_AVAILABLE  # no longer needed
    with pytest.raises(FailedPrecondition, match="no previous route to roll back to"):
        rollback(registry)


def test_shadow_mirrors_every_request_and_counts_disagreements(registry: ModelRegistry) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    deploy(registry, H64)
    route(registry, split=split((1, 100)), shadow=2)
    for row in range(len(x)):
        assert infer(registry, x[row : row + 1]).version == 1
    stats = _shadow_counters(registry, 2, len(x))
    assert stats.requests == 0  # shadow answers are not requests
    mirrored = stats.shadow_requests
    assert mirrored + stats.shadow_dropped == len(x)
    different = int(np.sum(reference(FP32, x).argmax(1) != reference(H64, x).argmax(1)))
    assert different > 0  # the two classifiers do differ on some rows
    if stats.shadow_dropped == 0:
        assert stats.disagreements == different
    assert 0 < stats.disagreements <= mirrored


def _shadow_counters(registry: ModelRegistry, version: int, total: int) -> CountersSnapshot:
    """The shadow's counters once every mirrored request has been run or dropped."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = next(r for r in registry.version_stats() if r.version == version)
        if row.counters.shadow_requests + row.counters.shadow_dropped >= total:
            return row.counters
        time.sleep(0.01)
    raise AssertionError("the shadow did not catch up within 30s")


def test_fallback_answers_from_the_secondary_when_the_primary_is_late(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    deploy(registry, SLOW)
    deploy(registry, FP32)
    route(
        registry,
        policy=pb.ROUTE_POLICY_FALLBACK,
        split=split((1, 100)),
        secondary=2,
        deadline_seconds=0.001,
    )
    results = [infer(registry, x[i : i + 1]) for i in range(5)]
    assert {r.version for r in results} == {2}
    assert all(r.parameters == {"mle_policy": "fallback"} for r in results)
    np.testing.assert_allclose(results[0].outputs["probabilities"], reference(FP32, x[:1]))
    assert version_of(model_status(registry), 2).stats.fallbacks == 5

    route(
        registry,
        policy=pb.ROUTE_POLICY_FALLBACK,
        split=split((1, 100)),
        secondary=2,
        deadline_seconds=60,
    )
    on_time = infer(registry, x[:1])
    assert (on_time.version, dict(on_time.parameters)) == (1, {})
    assert version_of(model_status(registry), 2).stats.fallbacks == 5


def test_consensus_answers_the_majority_class_of_three_classifiers(
    registry: ModelRegistry,
) -> None:
    x, _ = digit_rows()
    for filename in (FP32, INT8, H64):
        deploy(registry, filename)
    route(registry, policy=pb.ROUTE_POLICY_CONSENSUS, members=[1, 2, 3])
    result = infer(registry, x)
    assert result.parameters == {"mle_consensus": "1,2,3"}
    assert result.version in (1, 2, 3)
    votes = np.stack([reference(f, x).argmax(1) for f in (FP32, INT8, H64)])
    expected = []
    for column in votes.T:
        tally = Counter(column.tolist())
        best = max(tally.values())
        expected.append(next(v for v in column.tolist() if tally[v] == best))
    assert result.outputs["probabilities"].argmax(1).tolist() == expected
    assert (votes != votes[0]).any()  # the members do disagree somewhere: a real vote


def test_bad_requests_get_the_right_error_and_serving_goes_on(registry: ModelRegistry) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    cases = [
        (InferRequest("nope", {"input": x[:1]}), NotFound, "model 'nope' is not deployed"),
        (InferRequest("digits", {"input": x[:1]}, version=7), NotFound, "has no version 7"),
        (
            InferRequest("digits", {"input": x[:1].astype(np.float64)}),
            InvalidInput,
            "input 'input' must be FP32, got FP64",
        ),
        (
            InferRequest("digits", {"input": x[:1, :63]}),
            InvalidInput,
            r"must have shape \[-1, 64\], got \[1, 63\]",
        ),
        (InferRequest("digits", {"input": x[0]}), InvalidInput, "must have shape"),
        (InferRequest("digits", {"pixels": x[:1]}), InvalidInput, "has no input 'pixels'"),
        (InferRequest("digits", {}), InvalidInput, "input 'input' is missing"),
        (
            InferRequest("digits", {"input": x[:1]}, outputs=("logits",)),
            InvalidInput,
            "has no output 'logits'",
        ),
    ]
    for request, error, message in cases:
        with pytest.raises(error, match=message):
            registry.infer(request)
    assert version_of(model_status(registry), 1).stats.errors == len(cases) - 2
    only = registry.infer(InferRequest("digits", {"input": x[:2]}, outputs=("probabilities",)))
    assert list(only.outputs) == ["probabilities"]


def test_bad_deploys_are_refused_and_the_serving_version_stays(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    missing = "sha256:" + "0" * 64
    with pytest.raises(NotFound, match="is not on this agent: upload it first"):
        registry.deploy(pb.DeployRequest(name="digits", digest=missing, filename="m.onnx"))
    with pytest.raises(InvalidInput, match="invalid model name"):
        deploy(registry, FP32, name="../escape")
    text = tmp_path / "notes.txt"
    text.write_text("not a model at all\n")
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((MODELS / INT8).read_bytes()[:1500])
    for path, message in ((text, "notes.txt is not an ONNX or TFLite model"), (truncated, "cut")):
        digest, _ = registry.store.put_file(path)
        request = pb.DeployRequest(name="digits", digest=digest, filename=path.name)
        with pytest.raises(InvalidInput, match=message):
            registry.deploy(request)
    other, _ = registry.store.put_file(other_signature_model(tmp_path / "other.onnx"))
    with pytest.raises(InvalidInput, match="must keep the signature"):
        registry.deploy(pb.DeployRequest(name="digits", digest=other, filename="other.onnx"))
    with pytest.raises(InvalidInput, match="canary percent"):
        deploy(registry, INT8, canary_percent=150)
    status = model_status(registry)
    assert [v.version for v in status.versions] == [1]
    assert infer(registry, x[:2]).version == 1
    assert sorted(p.name for p in (registry.settings.models_root / "digits").iterdir()) == [
        "1",
        "route.json",
    ]


def test_routes_are_validated(registry: ModelRegistry) -> None:
    deploy(registry, FP32)
    deploy(registry, INT8)
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        (dict(split=split((1, 60), (2, 30))), InvalidInput, "sum to 90, not 100"),
        (dict(split=split((1, 100), (9, 0))), NotFound, "has no version 9"),
        (dict(split=[]), InvalidInput, "names no version"),
        (dict(split=split((1, 100)), shadow=1), InvalidInput, "cannot shadow itself"),
        (
            dict(policy=pb.ROUTE_POLICY_FALLBACK, split=split((1, 100)), secondary=2),
            InvalidInput,
            "needs a secondary and a deadline",
        ),
        (dict(policy=pb.ROUTE_POLICY_CONSENSUS, members=[1]), InvalidInput, "at least 2"),
    ]
    for fields, error, message in cases:
        with pytest.raises(error, match=message):
            route(registry, **fields)
    assert [w.version for w in model_status(registry).route.split] == [2]
    with pytest.raises(NotFound):
        route(registry, name="other", split=split((1, 100)))


def test_undeploy_refuses_a_routed_version_and_removes_others(registry: ModelRegistry) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    deploy(registry, INT8)
    with pytest.raises(
        FailedPrecondition, match=r"version 2 is in use by the route \(split 2:100%\)"
    ):
        registry.undeploy(pb.UndeployRequest(name="digits", version=2))
    left = registry.undeploy(pb.UndeployRequest(name="digits", version=1))
    assert [v.version for v in left.versions] == [2]
    assert not (registry.settings.models_root / "digits" / "1").exists()
    with pytest.raises(FailedPrecondition, match="version 1 was undeployed"):
        rollback(registry)
    with pytest.raises(NotFound):
        registry.undeploy(pb.UndeployRequest(name="digits", version=1))
    registry.undeploy(pb.UndeployRequest(name="digits"))
    assert registry.status() == []
    assert not (registry.settings.models_root / "digits").exists()
    with pytest.raises(NotFound):
        infer(registry, x[:1])


def test_an_explicit_version_must_be_loaded(registry: ModelRegistry) -> None:
    x, _ = digit_rows()
    deploy(registry, FP32)
    deploy(registry, INT8)
    deploy(registry, H64)
    assert infer(registry, x[:1], version=2).version == 2  # the previous primary, still loaded
    with pytest.raises(FailedPrecondition, match="version 1 is not loaded; route traffic to it"):
        infer(registry, x[:1], version=1)
    assert registry.ready("digits") and registry.ready()
    assert not registry.ready("digits", 1)
    meta = registry.metadata("digits")
    assert (meta.versions, meta.platform) == ((1, 2, 3), "onnxruntime_onnx")


def test_a_restarted_registry_serves_the_same_route(tmp_path: Path) -> None:
    x, _ = digit_rows()
    settings = registry_settings(tmp_path)
    with open_registry(settings) as first:
        deploy(first, FP32)
        deploy(first, INT8, canary_percent=25)
        before = model_status(first)
        answers = {i: infer(first, x[:1], request_id=str(i)).version for i in range(50)}
    with open_registry(settings) as second:
        after = model_status(second)
        assert after.route == before.route
        assert {v.version: v.state for v in after.versions} == {
            1: pb.VERSION_STATE_READY,
            2: pb.VERSION_STATE_READY,
        }
        assert {i: infer(second, x[:1], request_id=str(i)).version for i in answers} == answers
        assert rollback(second).route.split[0].version == 1  # the history survived too


def test_a_version_that_no_longer_loads_is_failed_and_the_agent_starts(tmp_path: Path) -> None:
    settings = registry_settings(tmp_path)
    with open_registry(settings) as first:
        deploy(first, FP32)
    model_file = settings.models_root / "digits" / "1" / "model.onnx"
    model_file.unlink()
    model_file.write_bytes(b"\x08\x07garbage")
    with open_registry(settings) as second:
        v1 = version_of(model_status(second), 1)
        assert v1.state == pb.VERSION_STATE_FAILED
        assert v1.message.startswith(f"{FP32} is corrupt: sha256 ")
        assert not second.ready()
        with pytest.raises(
            FailedPrecondition, match=f"version 1 failed to load: {FP32} is corrupt"
        ):
            infer(second, digit_rows()[0][:1])


def test_a_tflite_model_serves_like_its_onnx_twin(registry: ModelRegistry) -> None:
    pytest.importorskip("ai_edge_litert", reason="the litert extra is not installed")
    x, _ = digit_rows()
    deployed = deploy(registry, "digits_fp32.tflite", name="digits-lite")
    assert version_of(deployed.model, 1).runtime == "litert"
    assert (registry.settings.models_root / "digits-lite" / "1" / "model.tflite").exists()
    assert registry.metadata("digits-lite").platform == "tensorflow_lite"
    result = infer(registry, x[:1], name="digits-lite")
    np.testing.assert_allclose(result.outputs["probabilities"], reference(FP32, x[:1]), atol=1e-5)
