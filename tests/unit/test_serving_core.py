"""Pure parts of the serving core: model names, routes, sticky buckets, percentiles, manifests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mle_agent.serving.backend import TensorSpec
from mle_agent.serving.repository import Manifest, ModelRepository, check_name
from mle_agent.serving.routing import (
    CONSENSUS,
    FALLBACK,
    Route,
    bucket_of,
    pick,
    validate_route,
    vote_kind,
)
from mle_agent.serving.stats import VersionCounters
from mle_proto.errors import AlreadyExists, InvalidInput, NotFound


@pytest.mark.parametrize("name", ["digits", "a", "0x.y-z_9", "m" * 64])
def test_valid_model_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "..", "../x", "/abs", "a/b", "Digits", ".hidden", "-x", "m" * 65, "a\x00b"]
)
def test_model_names_that_could_escape_or_confuse_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid model name"):
        check_name(name)


routes = st.one_of(
    st.builds(
        lambda v, p: Route.canary(v, v + 1, p),
        st.integers(1, 1000),
        st.floats(0, 100, allow_nan=False),
    ),
    st.builds(
        lambda m, s: Route(policy=CONSENSUS, members=tuple(m), shadow=s),
        st.lists(st.integers(1, 1000), min_size=2, max_size=5, unique=True),
        st.integers(0, 5),
    ),
    st.builds(
        lambda v, d: Route(FALLBACK, ((v, 100.0),), secondary=v + 1, deadline_seconds=d),
        st.integers(1, 1000),
        st.floats(0.001, 10),
    ),
)


@given(routes)
def test_routes_round_trip_through_json_and_the_wire(route: Route) -> None:
    assert Route.from_json(json.loads(json.dumps(route.to_json()))) == route
    assert Route.from_proto(route.to_proto()) == route


def test_buckets_are_stable_and_spread() -> None:
    assert bucket_of("request-1") == bucket_of("request-1")
    buckets = {bucket_of(f"id-{i}") for i in range(1000)}
    assert len(buckets) > 900


def test_growing_a_canary_keeps_the_requests_it_already_had() -> None:
    ids = [f"user-{i}" for i in range(3000)]
    at_10 = {i for i in ids if pick(Route.canary(2, 1, 10), i) == 2}
    at_20 = {i for i in ids if pick(Route.canary(2, 1, 20), i) == 2}
    assert at_10 < at_20
    assert 0.07 < len(at_10) / len(ids) < 0.13


def test_route_validation_names_the_problem() -> None:
    with pytest.raises(NotFound, match="model m has no version 3"):
        validate_route("m", Route.canary(3, 1, 50), {1, 2})
    with pytest.raises(InvalidInput, match="a version appears twice"):
        validate_route("m", Route(split=((1, 50.0), (1, 50.0))), {1})
    with pytest.raises(InvalidInput, match="secondary must not be in the split"):
        validate_route("m", Route(FALLBACK, ((1, 100.0),), secondary=1, deadline_seconds=1), {1})
    validate_route("m", Route(CONSENSUS, members=(1, 2, 3), shadow=4), {1, 2, 3, 4})
    assert Route(CONSENSUS, members=(1, 2, 3), shadow=4).describe() == (
        "consensus of 1,2,3, shadow 4"
    )


@pytest.mark.parametrize("deadline", [math.inf, -math.inf, math.nan, -0.5, 60.001, 1e300])
def test_a_fallback_deadline_must_be_finite_and_at_most_a_minute(deadline: float) -> None:
    route = Route(FALLBACK, ((1, 100.0),), secondary=2, deadline_seconds=deadline)
    with pytest.raises(InvalidInput, match="deadline must be more than 0 and at most 60 seconds"):
        validate_route("m", route, {1, 2})


def test_fallback_deadlines_up_to_a_minute_are_fine() -> None:
    for deadline in (0.0005, 1.0, 60.0):
        route = Route(FALLBACK, ((1, 100.0),), secondary=2, deadline_seconds=deadline)
        validate_route("m", route, {1, 2})


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        (TensorSpec("label", "INT64", (-1,)), "label"),
        (TensorSpec("label", "UINT8", (1,)), "label"),
        (TensorSpec("p", "FP32", (-1, 10)), "scores"),
        (TensorSpec("p", "FP16", (1, -1)), "scores"),
        (TensorSpec("p", "FP32", (-1,)), ""),  # a regression value: nothing to vote on
        (TensorSpec("p", "FP32", (-1, 1)), ""),  # one column: every member always agrees
        (TensorSpec("p", "FP32", (-1, 3, 3)), ""),
        (TensorSpec("p", "BOOL", (-1, 4)), ""),
        (TensorSpec("p", "INT64", ()), ""),
    ],
)
def test_consensus_votes_on_class_labels_or_class_scores(spec: TensorSpec, kind: str) -> None:
    assert vote_kind(spec) == kind
    outputs = {1: (spec,), 2: (spec,)}
    route = Route(CONSENSUS, members=(1, 2))
    if kind:
        validate_route("m", route, {1, 2}, outputs=outputs)
    else:
        with pytest.raises(InvalidInput, match="consensus votes on the first output"):
            validate_route("m", route, {1, 2}, outputs=outputs)


def test_the_primary_of_an_even_split_is_the_newest_version() -> None:
    assert Route(split=((1, 50.0), (2, 50.0))).primary == 2
    assert Route(split=((2, 50.0), (1, 50.0))).primary == 2
    assert Route(split=((1, 60.0), (2, 40.0))).primary == 1


def test_percentiles_are_estimated_within_their_bucket() -> None:
    counters = VersionCounters()
    for _ in range(90):
        counters.record_request(0.003, ok=True)  # bucket (2.5ms, 5ms]
    for _ in range(10):
        counters.record_request(0.2, ok=False)  # bucket (100ms, 250ms]
    counters.record_rejected()
    snapshot = counters.snapshot()
    assert (snapshot.requests, snapshot.errors) == (101, 11)
    assert 0.0025 <= snapshot.percentile(0.5) <= 0.005
    assert 0.1 <= snapshot.percentile(0.99) <= 0.25
    assert snapshot.to_proto().p95_seconds >= snapshot.to_proto().p50_seconds


def _manifest(version: int) -> Manifest:
    spec = TensorSpec("input", "FP32", (-1, 64))
    return Manifest("digits", version, "sha256:" + "a" * 64, "onnxruntime", "m.onnx", 3, 1.0,
                    (spec,), (spec,), max_batch_size=8, max_queue_delay=0.01)  # fmt: skip


def test_versions_are_written_whole_and_leftovers_cleaned(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    source = tmp_path / "model.onnx"
    source.write_bytes(b"abc")
    path = repository.add_version(_manifest(1), source)
    assert path == tmp_path / "models" / "digits" / "1" / "model.onnx"
    with pytest.raises(AlreadyExists):
        repository.add_version(_manifest(1), source)
    leftover = tmp_path / "models" / "digits" / ".tmp-2-dead"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    (tmp_path / "models" / "digits" / "7").mkdir()  # a version dir without a manifest
    repository.clean("digits")
    assert not leftover.exists()
    assert repository.manifests("digits") == {1: _manifest(1)}
    repository.write_route("digits", Route.single(1), [Route.canary(1, 2, 5)])
    assert repository.read_route("digits") == (Route.single(1), [Route.canary(1, 2, 5)])
    repository.remove_version("digits", 1)
    assert repository.manifests("digits") == {}
